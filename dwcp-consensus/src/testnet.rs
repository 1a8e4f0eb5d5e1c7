//! In-process network for tests.
