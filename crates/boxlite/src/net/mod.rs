//! Network backends for a Box's NIC: usernet (ours), libslirp, passt, none.
