//! placeholder (being written)
#[test]
fn placeholder() {}
