#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| umbra_shadow::fuzzing::change_fields(data));
