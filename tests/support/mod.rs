#![allow(dead_code)]
pub mod browser;
pub mod job;
pub mod kafka;
pub mod outputs;
pub mod reference;
