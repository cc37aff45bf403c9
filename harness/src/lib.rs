//! The harness's library part: the scenario file model, so that the fuzz target
//! `parse_scenario` and the tests reach it. Everything else lives in the binary (`main.rs`).

/// Scenario files (`harness scenario FILE`).
pub mod scenario {
    pub mod spec;
}
