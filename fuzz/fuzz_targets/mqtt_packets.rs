#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| umbra_broker::fuzzing::mqtt_packets(data));
