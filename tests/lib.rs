//! End-to-end scenarios live in this package's `[[test]]` targets; the library is empty.
