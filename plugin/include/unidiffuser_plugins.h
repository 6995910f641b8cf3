// C API of libunidiffuser_plugins.so: fused GroupNorm(+SiLU) with fp32 statistics.
//
// Called by the torch backend through ctypes (models/groupnorm.py) and by the TensorRT plugin.
// Every entry point is safe inside CUDA-graph capture: it only launches kernels on `stream`;
// it never allocates, synchronizes, or reads device memory from the host.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types of x / y / gamma / beta (all four share one type).
enum { UD_DTYPE_FLOAT32 = 0, UD_DTYPE_FLOAT16 = 1, UD_DTYPE_BFLOAT16 = 2 };
// Memory layouts of x / y (both share one). NHWC is torch's channels_last.
enum { UD_LAYOUT_NCHW = 0, UD_LAYOUT_NHWC = 1 };

// Bytes of device workspace unidiffuser_group_norm needs for this problem (depends only on the
// arguments, never on the device or pointers), or 0 when the arguments are invalid.
size_t unidiffuser_group_norm_workspace_size(int n, int c, int h, int w, int num_groups, int dtype, int layout);

// y = GroupNorm(x) * gamma + beta, then y = y * sigmoid(y) when silu != 0.
// gamma / beta may be NULL (meaning 1 / 0). workspace: >= workspace_size bytes, 16-byte aligned,
// no initial contents needed. Returns 0 (cudaSuccess) or a cudaError_t code; on failure
// unidiffuser_group_norm_error_string() says why.
int unidiffuser_group_norm(const void* x, const void* gamma, const void* beta, void* y, int n, int c, int h, int w,
    int num_groups, float eps, int silu, int dtype, int layout, void* workspace, size_t workspace_bytes,
    cudaStream_t stream);

// Same, with an explicit NHWC pixel stride (elements between consecutive pixels, >= c), for
// padded channel-last formats such as TensorRT's kHWC8. Ignored (must be c) for NCHW.
int unidiffuser_group_norm_strided(const void* x, const void* gamma, const void* beta, void* y, int n, int c,
    int h, int w, int pixel_stride, int num_groups, float eps, int silu, int dtype, int layout, void* workspace,
    size_t workspace_bytes, cudaStream_t stream);

// Human-readable reason for this thread's last failed call ("" if none).
const char* unidiffuser_group_norm_error_string(void);

// Whether this build has a kernel the given device can run: 0, with the SASS version the driver
// picked (e.g. 86, or 0 if it JIT-compiled PTX) and the PTX version of the image in
// *binary_version / *ptx_version (either may be NULL); otherwise the cudaError_t code
// (cudaErrorNoKernelImageForDevice, or cudaErrorInvalidDevice for a bad index) and the error
// string says why. Loads the library's module on that device; do it once before graph capture.
int unidiffuser_group_norm_device_check(int device, int* binary_version, int* ptx_version);

// The CUDA targets this library was compiled for, as CMake's CUDA_ARCHITECTURES ("80-real 86-real
// ... 120-virtual").
const char* unidiffuser_plugins_cuda_archs(void);

#ifdef __cplusplus
}
#endif
