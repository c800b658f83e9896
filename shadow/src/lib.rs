//! Shadow engine.
