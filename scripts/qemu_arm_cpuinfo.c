// Preloaded into aarch64 programs run under qemu-user (scripts/aarch64_check.sh): shows them an
// ARM /proc/cpuinfo and MIDR_EL1 instead of the x86 host's.
//
// qemu-user before 8.1 passes the host's /proc/cpuinfo through, and torch's cpuinfo library
// dereferences a null pointer when it finds no ARM processor in it; oneDNN reads MIDR_EL1 from a
// sysfs file that an x86 host does not have. Paths are redirected to the files that
// QEMU_ARM_CPUINFO and QEMU_ARM_MIDR name; everything else opens as usual.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char* redirect(const char* path) {
  if (path == NULL) return path;
  const char* cpuinfo = getenv("QEMU_ARM_CPUINFO");
  if (cpuinfo != NULL && strcmp(path, "/proc/cpuinfo") == 0) return cpuinfo;
  const char* midr = getenv("QEMU_ARM_MIDR");
  if (midr != NULL &&
      fnmatch("/sys/devices/system/cpu/cpu*/regs/identification/midr_el1", path, 0) == 0) {
    return midr;
  }
  return path;
}

// open and openat take a mode only with O_CREAT or O_TMPFILE.
int open(const char* path, int flags, ...) {
  static int (*real)(const char*, int, ...);
  if (real == NULL) real = (int (*)(const char*, int, ...))dlsym(RTLD_NEXT, "open");
  mode_t mode = 0;
  if (__OPEN_NEEDS_MODE(flags)) {
    va_list args;
    va_start(args, flags);
    mode = va_arg(args, mode_t);
    va_end(args);
  }
  return real(redirect(path), flags, mode);
}
int open64(const char* path, int flags, ...) __attribute__((alias("open")));

int openat(int dir, const char* path, int flags, ...) {
  static int (*real)(int, const char*, int, ...);
  if (real == NULL) real = (int (*)(int, const char*, int, ...))dlsym(RTLD_NEXT, "openat");
  mode_t mode = 0;
  if (__OPEN_NEEDS_MODE(flags)) {
    va_list args;
    va_start(args, flags);
    mode = va_arg(args, mode_t);
    va_end(args);
  }
  return real(dir, redirect(path), flags, mode);
}
int openat64(int dir, const char* path, int flags, ...) __attribute__((alias("openat")));

FILE* fopen(const char* path, const char* mode) {
  static FILE* (*real)(const char*, const char*);
  if (real == NULL) real = (FILE * (*)(const char*, const char*)) dlsym(RTLD_NEXT, "fopen");
  return real(redirect(path), mode);
}
FILE* fopen64(const char* path, const char* mode) __attribute__((alias("fopen")));
