#![allow(dead_code)]
pub mod browser;
pub mod job;
pub mod reference;
