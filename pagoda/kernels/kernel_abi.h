// Included by every kernel: a marker in the library's bytes naming the target it was compiled for (the compiler's
// expansion of -march=native) and the ABI version of its C interface. kernels.load reads it from the file before
// dlopen, so a library built for another CPU (a shared model store, a container image, a CI cache) is rebuilt,
// never loaded. Both macros are defined on the compiler's command line by kernels.load.
#pragma once

#if !defined(PAGODA_KERNEL_TARGET) || !defined(PAGODA_KERNEL_ABI)
#error "kernels are built by pagoda.kernels.load, which defines PAGODA_KERNEL_TARGET and PAGODA_KERNEL_ABI"
#endif

#define PAGODA_STR_(x) #x
#define PAGODA_STR(x) PAGODA_STR_(x)

extern "C" __attribute__((used, visibility("default")))
const char pagoda_kernel_marker[] = "PAGODA_KERNEL[target=" PAGODA_KERNEL_TARGET ";abi=" PAGODA_STR(PAGODA_KERNEL_ABI) "]";
