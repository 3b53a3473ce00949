//! End-to-end tests of the `loraloop` binary: one integration-test binary, modules in e2e/.

mod e2e;
