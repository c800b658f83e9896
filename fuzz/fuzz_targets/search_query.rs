#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| umbra_shadow::fuzzing::search_query(data));
