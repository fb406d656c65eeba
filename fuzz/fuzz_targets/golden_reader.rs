//! The golden file reader on arbitrary bytes: it returns `Ok` or `Err`, never panics; every case
//! it accepts is then checked in f64 and f32, which must not panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cases) = bnorm::golden::parse(text) {
        for case in &cases {
            let _ = bnorm::golden::check_case::<f64>(case);
            let _ = bnorm::golden::check_case::<f32>(case);
        }
    }
});
