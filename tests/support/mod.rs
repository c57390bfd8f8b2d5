#![allow(dead_code)]
pub mod job;
pub mod reference;
