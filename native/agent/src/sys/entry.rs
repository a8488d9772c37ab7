//! The C entry point (`no_main`): std's runtime would abort when descriptors 0-2 are closed and
//! /dev/null does not exist, which is exactly the situation of /init in an initramfs. An
//! exported symbol is unsafe code, so it lives here and hands over to the crate's own main.

#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    crate::agent_main()
}
