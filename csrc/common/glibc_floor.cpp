// Keeps every fused_opt library loadable on glibc 2.28 (manylinux_2_28: RHEL 8, Ubuntu 20.04),
// whatever glibc builds it. Only three symbols of a newer glibc are ever pulled in:
//
// - pow@GLIBC_2.29 (std::pow of the bias corrections). glibc 2.29 gave pow a new default
//   version without changing what it computes for finite input; the previous version,
//   pow@GLIBC_2.2.5 (2.17 on aarch64), is the same function reached through a wrapper that also
//   sets errno. The build links with -Wl,--wrap=pow, so every call lands in __wrap_pow below,
//   which calls that older version.
// - dlsym@GLIBC_2.34 (torch 2.14's stable-ABI headers look up newer shim functions at run time).
//   glibc 2.34 moved dlsym from libdl into libc under a new version; dlsym@GLIBC_2.2.5 (2.17 on
//   aarch64) is the same function, in libdl before 2.34 and in libc since (the build links
//   libdl, so it is loaded there). -Wl,--wrap=dlsym sends the calls to __wrap_dlsym, as for pow.
// - __libc_single_threaded@GLIBC_2.32, which libstdc++'s shared_ptr reads to skip its atomic
//   reference counts in single-threaded processes. A hidden definition here, always 0 ("other
//   threads may exist"), binds those reads inside the library: the counts are then always
//   atomic, which is correct everywhere.
#if defined(__linux__)
#include <features.h>  // defines __GLIBC__ when the C library is glibc
#endif
#if defined(__linux__) && defined(__GLIBC__)

#if defined(__x86_64__)
__asm__(".symver fused_opt_old_pow, pow@GLIBC_2.2.5");
__asm__(".symver fused_opt_old_dlsym, dlsym@GLIBC_2.2.5");
#elif defined(__aarch64__)
__asm__(".symver fused_opt_old_pow, pow@GLIBC_2.17");
__asm__(".symver fused_opt_old_dlsym, dlsym@GLIBC_2.17");
#else
#error "glibc_floor.cpp: name the oldest pow symbol version of this architecture"
#endif

extern "C" {
double fused_opt_old_pow(double base, double exponent);

__attribute__((visibility("hidden"))) double __wrap_pow(double base, double exponent) {
  return fused_opt_old_pow(base, exponent);
}

void* fused_opt_old_dlsym(void* handle, const char* name);

__attribute__((visibility("hidden"))) void* __wrap_dlsym(void* handle, const char* name) {
  return fused_opt_old_dlsym(handle, name);
}

__attribute__((visibility("hidden"))) char __libc_single_threaded = 0;
}

#endif
