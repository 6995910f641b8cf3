// Fused GroupNorm(+SiLU): fp16/bf16/fp32 in and out, statistics in fp32 (fp64 for the final merge).
//
// Three launches on one stream, no atomics, no memset, no host sync (CUDA-graph safe):
//   1. stats:    one block per (sample, tile of the sample's data). Each thread accumulates
//                sum(x - K) and sum((x - K)^2) in fp32, where K is a value taken from the tile
//                itself (per channel for NHWC, per tile for NCHW). Shifting by a sample of the data
//                keeps the squares small, so E[x^2] - E[x]^2 no longer cancels catastrophically
//                when |mean| >> std. The block turns its sums into a tile (mean, M2) pair.
//   2. finalize: one block per (sample, group) merges the tile pairs (Chan's parallel formula, in
//                double) and writes per-channel {scale = gamma*rstd, mean, beta}.
//   3. apply:    y = (x - mean) * scale + beta (+ SiLU), 16-byte vector loads/stores. It walks the
//                tiles in reverse order so its first reads hit what the stats pass left in L2.
// (x - mean) is formed before scaling, instead of x * scale + shift, so fp32 outputs keep their
// accuracy when |mean| >> std (the folded form loses ~|mean|/std ulps).

#include "unidiffuser_plugins.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdarg>

namespace
{

constexpr int kThreads = 256;       // threads per stats/apply block
constexpr int kTargetBlocks = 1024; // ~8 blocks per SM on a 132-SM H100: enough loads in flight
constexpr int kMinIters = 4;        // per-thread loads per tile, bounds that keep tiles neither
constexpr int kMaxIters = 64;       // too small (reduction overhead) nor too few (idle SMs)
constexpr int kMinItersNhwc = 8;    // NHWC blocks also pay a per-channel smem reduction and load
                                    // per-channel coefficients: amortize them over more pixels
constexpr int kMaxChannels = 4096;  // stats smem holds per-channel partials for the whole row
constexpr int kUnroll = 4;          // independent 16-byte loads in flight per thread

thread_local char tErr[512] = "";

int fail(int code, const char* fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tErr, sizeof(tErr), fmt, ap);
    va_end(ap);
    return code;
}

// ---- element conversion -------------------------------------------------------------------------

__device__ __forceinline__ float toF(float v) { return v; }
__device__ __forceinline__ float toF(__half v) { return __half2float(v); }
__device__ __forceinline__ float toF(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T fromF(float v);
template <> __device__ __forceinline__ float fromF<float>(float v) { return v; }
template <> __device__ __forceinline__ __half fromF<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 fromF<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// A VEC-element pack aligned to its size, so a pack load is one LDG.128 when VEC*sizeof(T) == 16.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack
{
    T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> ld(const T* p)
{
    return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

// x * sigmoid(x) with the hardware ex2/rcp approximations (rel. error ~1e-7, far under fp16's
// rounding); two MUFU ops per element keep the SFUs well below the memory-bound rate.
__device__ __forceinline__ float silu(float v) { return __fdividef(v, 1.0f + __expf(-v)); }

// Per-channel coefficients written by finalize and read by apply.
struct alignas(16) ChanCoef
{
    float scale; // gamma * rstd
    float mean;  // group mean (per channel copy, so apply needs no channel -> group division)
    float beta;
    float pad;
};

// ---- NHWC -----------------------------------------------------------------------------------------
// A tile is P consecutive pixels of one sample, all C channels: contiguous memory. Threads are
// laid out [row][column]: a column is VEC consecutive channels (one 16-byte pack), consecutive
// threads take consecutive columns, so each warp load is fully coalesced along C, and each thread
// keeps the same channels for the whole tile (its shifts and sums stay in registers). C wider than
// kThreads columns is walked in column chunks.

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) statsNhwc(
    const T* __restrict__ x, int HW, int C, int cs, int G, int P, float2* __restrict__ part)
{
    extern __shared__ float2 smem[];
    float2* red = smem;                   // [kThreads][VEC] per-thread (sum, sumsq)
    float2* chan = smem + kThreads * VEC; // [C] per-channel tile (mean, M2)

    const int t = blockIdx.x, n = blockIdx.y;
    const int p0 = t * P, p1 = min(p0 + P, HW);
    const float cnt = float(p1 - p0);
    const T* xn = x + size_t(n) * HW * cs;
    const int V = C / VEC;

    for (int v0 = 0; v0 < V; v0 += kThreads)
    {
        const int Vc = min(V - v0, kThreads);
        const int rows = kThreads / Vc;
        const int r = threadIdx.x / Vc, v = threadIdx.x % Vc;
        if (r < rows)
        {
            const int c0 = (v0 + v) * VEC;
            float K[VEC], S[VEC], Q[VEC];
            const Pack<T, VEC> k = ld<T, VEC>(xn + size_t(p0) * cs + c0);
#pragma unroll
            for (int j = 0; j < VEC; ++j)
            {
                K[j] = toF(k.v[j]);
                S[j] = 0.f;
                Q[j] = 0.f;
            }
            auto acc = [&](const Pack<T, VEC>& a) {
#pragma unroll
                for (int j = 0; j < VEC; ++j)
                {
                    const float d = toF(a.v[j]) - K[j];
                    S[j] += d;
                    Q[j] = fmaf(d, d, Q[j]);
                }
            };
            const size_t step = size_t(rows) * cs;
            const T* ptr = xn + size_t(p0 + r) * cs + c0;
            int p = p0 + r;
            for (; p + (kUnroll - 1) * rows < p1; p += kUnroll * rows, ptr += kUnroll * step)
            {
                Pack<T, VEC> a[kUnroll];
#pragma unroll
                for (int u = 0; u < kUnroll; ++u)
                    a[u] = ld<T, VEC>(ptr + u * step);
#pragma unroll
                for (int u = 0; u < kUnroll; ++u)
                    acc(a[u]);
            }
            for (; p < p1; p += rows, ptr += step)
                acc(ld<T, VEC>(ptr));
#pragma unroll
            for (int j = 0; j < VEC; ++j)
                red[threadIdx.x * VEC + j] = make_float2(S[j], Q[j]);
        }
        __syncthreads();
        // All rows of a column share the shift K, so their sums simply add.
        for (int k = threadIdx.x; k < Vc * VEC; k += kThreads)
        {
            const int vv = k / VEC, j = k % VEC;
            float s = 0.f, q = 0.f;
            for (int rr = 0; rr < rows; ++rr)
            {
                const float2 e = red[(rr * Vc + vv) * VEC + j];
                s += e.x;
                q += e.y;
            }
            const int c = v0 * VEC + k;
            const float m = s / cnt;
            chan[c] = make_float2(toF(xn[size_t(p0) * cs + c]) + m, fmaxf(q - s * m, 0.f));
        }
        __syncthreads();
    }
    // Merge the group's channels (equal counts): M2 = sum M2_c + cnt * sum (mean_c - mean)^2.
    const int Cg = C / G;
    for (int g = threadIdx.x; g < G; g += kThreads)
    {
        float mean = 0.f;
        for (int c = g * Cg; c < (g + 1) * Cg; ++c)
            mean += chan[c].x;
        mean /= float(Cg);
        float m2 = 0.f, dev = 0.f;
        for (int c = g * Cg; c < (g + 1) * Cg; ++c)
        {
            const float d = chan[c].x - mean;
            m2 += chan[c].y;
            dev = fmaf(d, d, dev);
        }
        part[(size_t(n) * G + g) * gridDim.x + t] = make_float2(mean, fmaf(cnt, dev, m2));
    }
}

template <typename T, int VEC, bool SILU>
__global__ void __launch_bounds__(kThreads) applyNhwc(const T* __restrict__ x, T* __restrict__ y, int HW, int C,
    int cs, int P, const ChanCoef* __restrict__ coef)
{
    // Reverse order: the stats pass finished on the last tiles, which are still in L2.
    const int t = gridDim.x - 1 - blockIdx.x, n = gridDim.y - 1 - blockIdx.y;
    const int p0 = t * P, p1 = min(p0 + P, HW);
    const size_t base = size_t(n) * HW * cs;
    const int V = C / VEC;

    for (int v0 = 0; v0 < V; v0 += kThreads)
    {
        const int Vc = min(V - v0, kThreads);
        const int rows = kThreads / Vc;
        const int r = threadIdx.x / Vc, v = threadIdx.x % Vc;
        if (r >= rows)
            continue;
        const int c0 = (v0 + v) * VEC;
        float sc[VEC], mu[VEC], be[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j)
        {
            const ChanCoef k = coef[size_t(n) * C + c0 + j];
            sc[j] = k.scale;
            mu[j] = k.mean;
            be[j] = k.beta;
        }
        auto op = [&](const Pack<T, VEC>& a) {
            Pack<T, VEC> o;
#pragma unroll
            for (int j = 0; j < VEC; ++j)
            {
                float f = fmaf(toF(a.v[j]) - mu[j], sc[j], be[j]);
                if (SILU)
                    f = silu(f);
                o.v[j] = fromF<T>(f);
            }
            return o;
        };
        const size_t step = size_t(rows) * cs;
        size_t off = base + size_t(p0 + r) * cs + c0;
        int p = p0 + r;
        for (; p + (kUnroll - 1) * rows < p1; p += kUnroll * rows, off += kUnroll * step)
        {
            Pack<T, VEC> a[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                a[u] = ld<T, VEC>(x + off + u * step);
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                *reinterpret_cast<Pack<T, VEC>*>(y + off + u * step) = op(a[u]);
        }
        for (; p < p1; p += rows, off += step)
            *reinterpret_cast<Pack<T, VEC>*>(y + off) = op(ld<T, VEC>(x + off));
    }
}

// ---- NCHW -----------------------------------------------------------------------------------------
// The (n, g) group is one contiguous run of L = Cg*H*W elements; a tile is P elements of it.
// One shift per tile (its first element) is enough: a tile spans at most a few channels.

__device__ __forceinline__ float warpSum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) statsNchw(const T* __restrict__ x, int L, int P, float2* __restrict__ part)
{
    __shared__ float2 red[kThreads / 32];
    const int t = blockIdx.x, ng = blockIdx.y;
    const T* xg = x + size_t(ng) * L;
    const int e0 = t * P, e1 = min(e0 + P, L);
    const float K = toF(xg[e0]);
    float s = 0.f, q = 0.f;
    auto acc = [&](const Pack<T, VEC>& a) {
#pragma unroll
        for (int j = 0; j < VEC; ++j)
        {
            const float d = toF(a.v[j]) - K;
            s += d;
            q = fmaf(d, d, q);
        }
    };
    constexpr int kStep = kThreads * VEC;
    int e = e0 + threadIdx.x * VEC;
    for (; e + (kUnroll - 1) * kStep < e1; e += kUnroll * kStep)
    {
        Pack<T, VEC> a[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            a[u] = ld<T, VEC>(xg + e + u * kStep);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            acc(a[u]);
    }
    for (; e < e1; e += kStep)
        acc(ld<T, VEC>(xg + e));
    s = warpSum(s);
    q = warpSum(q);
    if ((threadIdx.x & 31) == 0)
        red[threadIdx.x >> 5] = make_float2(s, q);
    __syncthreads();
    if (threadIdx.x == 0)
    {
        s = 0.f;
        q = 0.f;
        for (int w = 0; w < kThreads / 32; ++w)
        {
            s += red[w].x;
            q += red[w].y;
        }
        const float cnt = float(e1 - e0), m = s / cnt;
        part[size_t(ng) * gridDim.x + t] = make_float2(K + m, fmaxf(q - s * m, 0.f));
    }
}

template <typename T, int VEC, bool SILU>
__global__ void __launch_bounds__(kThreads) applyNchw(
    const T* __restrict__ x, T* __restrict__ y, int L, int HW, int Cg, int P, const ChanCoef* __restrict__ coef)
{
    const int t = gridDim.x - 1 - blockIdx.x, ng = gridDim.y - 1 - blockIdx.y;
    const size_t base = size_t(ng) * L;
    const ChanCoef* cg = coef + size_t(ng) * Cg; // (n, g*Cg) == ng*Cg in the [N][C] coefficient array
    const int e0 = t * P, e1 = min(e0 + P, L);
    constexpr int kStep = kThreads * VEC;
    auto op = [&](const Pack<T, VEC>& a, int e) {
        const ChanCoef k = cg[e / HW]; // HW % VEC == 0, so a pack never straddles two channels
        Pack<T, VEC> o;
#pragma unroll
        for (int j = 0; j < VEC; ++j)
        {
            float f = fmaf(toF(a.v[j]) - k.mean, k.scale, k.beta);
            if (SILU)
                f = silu(f);
            o.v[j] = fromF<T>(f);
        }
        return o;
    };
    int e = e0 + threadIdx.x * VEC;
    for (; e + (kUnroll - 1) * kStep < e1; e += kUnroll * kStep)
    {
        Pack<T, VEC> a[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            a[u] = ld<T, VEC>(x + base + e + u * kStep);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            *reinterpret_cast<Pack<T, VEC>*>(y + base + e + u * kStep) = op(a[u], e + u * kStep);
    }
    for (; e < e1; e += kStep)
        *reinterpret_cast<Pack<T, VEC>*>(y + base + e) = op(ld<T, VEC>(x + base + e), e);
}

// ---- finalize -------------------------------------------------------------------------------------
// One block per (n, g): a single pass over the group's tile partials, contiguous at
// part[(n*G + g)*tiles + t], merged with Chan's formula in double. Tile t holds
// count(t) = min(tileElems, total - t*tileElems) elements.

constexpr int kFinThreads = 256;

struct Moments
{
    double n, mean, m2;
};

__device__ __forceinline__ Moments merge(Moments a, Moments b)
{
    const double n = a.n + b.n;
    if (n == 0.0)
        return a;
    const double d = b.mean - a.mean, f = b.n / n;
    return {n, a.mean + d * f, a.m2 + b.m2 + d * d * a.n * f};
}

__device__ __forceinline__ Moments shflXor(Moments v, int o)
{
    return {__shfl_xor_sync(0xffffffffu, v.n, o), __shfl_xor_sync(0xffffffffu, v.mean, o),
        __shfl_xor_sync(0xffffffffu, v.m2, o)};
}

template <typename T>
__global__ void __launch_bounds__(kFinThreads) finalize(const float2* __restrict__ part, int G, int C, int tiles,
    long long tileElems, long long total, float eps, const T* __restrict__ gamma, const T* __restrict__ beta,
    ChanCoef* __restrict__ coef)
{
    __shared__ Moments red[kFinThreads / 32];
    __shared__ float stat[2];
    const int ng = blockIdx.x, n = ng / G, g = ng % G;
    const float2* p = part + size_t(ng) * tiles;
    Moments acc{0.0, 0.0, 0.0};
    for (int t = threadIdx.x; t < tiles; t += kFinThreads)
    {
        const float2 e = p[t];
        acc = merge(acc, {double(min(tileElems, total - t * tileElems)), double(e.x), double(e.y)});
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        acc = merge(acc, shflXor(acc, o));
    if ((threadIdx.x & 31) == 0)
        red[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0)
    {
        Moments m = red[0];
        for (int w = 1; w < kFinThreads / 32; ++w)
            m = merge(m, red[w]);
        stat[0] = float(m.mean);
        stat[1] = float(1.0 / sqrt(m.m2 / double(total) + double(eps))); // biased variance, as torch
    }
    __syncthreads();
    const float mean = stat[0], rstd = stat[1];
    const int Cg = C / G;
    for (int c = g * Cg + threadIdx.x; c < (g + 1) * Cg; c += kFinThreads)
    {
        ChanCoef k;
        k.scale = (gamma ? toF(gamma[c]) : 1.f) * rstd;
        k.mean = mean;
        k.beta = beta ? toF(beta[c]) : 0.f;
        k.pad = 0.f;
        coef[size_t(n) * C + c] = k;
    }
}

// ---- host side ------------------------------------------------------------------------------------

struct Plan
{
    int P = 0;     // pixels (NHWC) or elements (NCHW) per tile
    int tiles = 0; // tiles per sample (NHWC) or per (sample, group) (NCHW)
    size_t partBytes = 0, coefBytes = 0;
};

size_t alignUp(size_t v, size_t a) { return (v + a - 1) / a * a; }
long long ceilDiv(long long a, long long b) { return (a + b - 1) / b; }

int elemBytes(int dtype) { return dtype == UD_DTYPE_FLOAT32 ? 4 : 2; }

// The plan depends only on the shape, dtype and layout (not on pointer alignment or the device),
// so the workspace size can be queried ahead of time.
Plan makePlan(int n, int c, int hw, int g, int dtype, int layout)
{
    Plan pl;
    const int vmax = 16 / elemBytes(dtype);
    if (layout == UD_LAYOUT_NHWC)
    {
        const int V = int(ceilDiv(c, vmax));
        const int rows = std::max(1, kThreads / std::min(V, kThreads));
        const long long want = ceilDiv((long long)n * hw, kTargetBlocks);
        const int iters = int(std::min<long long>(std::max<long long>(ceilDiv(want, rows), kMinItersNhwc), kMaxIters));
        pl.P = iters * rows;
        pl.tiles = int(ceilDiv(hw, pl.P));
        pl.partBytes = size_t(n) * pl.tiles * g * sizeof(float2);
    }
    else
    {
        const long long L = (long long)(c / g) * hw, perIter = (long long)kThreads * vmax;
        const long long want = ceilDiv((long long)n * g * L, kTargetBlocks);
        const long long iters = std::min<long long>(std::max<long long>(ceilDiv(want, perIter), kMinIters), kMaxIters);
        pl.P = int(iters * perIter);
        pl.tiles = int(ceilDiv(L, pl.P));
        pl.partBytes = size_t(n) * g * pl.tiles * sizeof(float2);
    }
    pl.partBytes = alignUp(pl.partBytes, 256);
    pl.coefBytes = size_t(n) * c * sizeof(ChanCoef);
    return pl;
}

int checkArgs(int n, int c, int h, int w, int cs, int g, int dtype, int layout)
{
    if (dtype < 0 || dtype > 2)
        return fail(cudaErrorInvalidValue, "dtype %d: expected 0 (float32), 1 (float16) or 2 (bfloat16)", dtype);
    if (layout != UD_LAYOUT_NCHW && layout != UD_LAYOUT_NHWC)
        return fail(cudaErrorInvalidValue, "layout %d: expected 0 (NCHW) or 1 (NHWC)", layout);
    if (n < 1 || c < 1 || h < 1 || w < 1 || g < 1)
        return fail(cudaErrorInvalidValue, "shape n=%d c=%d h=%d w=%d groups=%d: all must be >= 1", n, c, h, w, g);
    if (c % g != 0)
        return fail(cudaErrorInvalidValue, "channels %d not divisible by num_groups %d", c, g);
    if (layout == UD_LAYOUT_NHWC && c > kMaxChannels)
        return fail(cudaErrorInvalidValue, "NHWC supports at most %d channels, got %d", kMaxChannels, c);
    if (layout == UD_LAYOUT_NHWC && cs < c)
        return fail(cudaErrorInvalidValue, "pixel stride %d smaller than channels %d", cs, c);
    if (layout == UD_LAYOUT_NCHW && cs != c)
        return fail(cudaErrorInvalidValue, "pixel stride applies to NHWC only (got %d with c=%d for NCHW)", cs, c);
    if (layout == UD_LAYOUT_NCHW && (long long)n * g > 65535)
        return fail(cudaErrorInvalidValue, "NCHW supports n * num_groups <= 65535, got %d * %d", n, g);
    if (layout == UD_LAYOUT_NHWC && n > 65535)
        return fail(cudaErrorInvalidValue, "batch %d too large (max 65535)", n);
    const long long hw = (long long)h * w;
    if (hw > INT32_MAX / 2 || (long long)(c / g) * hw > INT32_MAX / 2)
        return fail(cudaErrorInvalidValue, "spatial size %lld too large (per-group elements must fit in int32)", hw);
    return 0;
}

bool aligned(const void* p, size_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

template <typename T, int VEC>
int launchAll(const T* x, const T* gamma, const T* beta, T* y, int N, int C, int HW, int cs, int G, float eps,
    bool act, int layout, const Plan& pl, void* ws, cudaStream_t stream)
{
    float2* part = static_cast<float2*>(ws);
    ChanCoef* coef = reinterpret_cast<ChanCoef*>(static_cast<char*>(ws) + pl.partBytes);
    const int Cg = C / G;
    long long tileElems, total = (long long)Cg * HW;
    if (layout == UD_LAYOUT_NHWC)
    {
        const dim3 grid(pl.tiles, N);
        const size_t smem = (size_t(kThreads) * VEC + C) * sizeof(float2);
        statsNhwc<T, VEC><<<grid, kThreads, smem, stream>>>(x, HW, C, cs, G, pl.P, part);
        tileElems = (long long)pl.P * Cg;
    }
    else
    {
        const dim3 grid(pl.tiles, N * G);
        statsNchw<T, VEC><<<grid, kThreads, 0, stream>>>(x, Cg * HW, pl.P, part);
        tileElems = pl.P;
    }
    finalize<T><<<N * G, kFinThreads, 0, stream>>>(part, G, C, pl.tiles, tileElems, total, eps, gamma, beta, coef);
    if (layout == UD_LAYOUT_NHWC)
    {
        const dim3 grid(pl.tiles, N);
        if (act)
            applyNhwc<T, VEC, true><<<grid, kThreads, 0, stream>>>(x, y, HW, C, cs, pl.P, coef);
        else
            applyNhwc<T, VEC, false><<<grid, kThreads, 0, stream>>>(x, y, HW, C, cs, pl.P, coef);
    }
    else
    {
        const dim3 grid(pl.tiles, N * G);
        if (act)
            applyNchw<T, VEC, true><<<grid, kThreads, 0, stream>>>(x, y, Cg * HW, HW, Cg, pl.P, coef);
        else
            applyNchw<T, VEC, false><<<grid, kThreads, 0, stream>>>(x, y, Cg * HW, HW, Cg, pl.P, coef);
    }
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return fail(e, "kernel launch failed: %s", cudaGetErrorString(e));
    return 0;
}

// Full 16-byte packs when the channel count / plane size and every pointer allow it, otherwise
// one element at a time (correct for any shape, just slower).
template <typename T>
int dispatch(const void* x, const void* gamma, const void* beta, void* y, int N, int C, int HW, int cs, int G,
    float eps, bool act, int layout, const Plan& pl, void* ws, cudaStream_t stream)
{
    constexpr int VEC = 16 / sizeof(T);
    const int inner = layout == UD_LAYOUT_NHWC ? (C % VEC == 0 && cs % VEC == 0) : (HW % VEC == 0);
    const bool vec = inner && aligned(x, 16) && aligned(y, 16);
    auto xt = static_cast<const T*>(x);
    auto gt = static_cast<const T*>(gamma);
    auto bt = static_cast<const T*>(beta);
    auto yt = static_cast<T*>(y);
    if (vec)
        return launchAll<T, VEC>(xt, gt, bt, yt, N, C, HW, cs, G, eps, act, layout, pl, ws, stream);
    return launchAll<T, 1>(xt, gt, bt, yt, N, C, HW, cs, G, eps, act, layout, pl, ws, stream);
}

} // namespace

extern "C" size_t unidiffuser_group_norm_workspace_size(
    int n, int c, int h, int w, int num_groups, int dtype, int layout)
{
    if (checkArgs(n, c, h, w, c, num_groups, dtype, layout) != 0)
        return 0;
    const Plan pl = makePlan(n, c, h * w, num_groups, dtype, layout);
    return pl.partBytes + pl.coefBytes;
}

extern "C" int unidiffuser_group_norm_strided(const void* x, const void* gamma, const void* beta, void* y, int n,
    int c, int h, int w, int pixel_stride, int num_groups, float eps, int silu, int dtype, int layout,
    void* workspace, size_t workspace_bytes, cudaStream_t stream)
{
    tErr[0] = '\0';
    if (int e = checkArgs(n, c, h, w, pixel_stride, num_groups, dtype, layout))
        return e;
    if (!x || !y)
        return fail(cudaErrorInvalidValue, "x and y must be non-null device pointers");
    if (!(eps >= 0.f))
        return fail(cudaErrorInvalidValue, "eps must be >= 0, got %g", double(eps));
    const Plan pl = makePlan(n, c, h * w, num_groups, dtype, layout);
    const size_t need = pl.partBytes + pl.coefBytes;
    if (!workspace || workspace_bytes < need)
        return fail(cudaErrorInvalidValue, "workspace of %zu bytes at %p: need %zu bytes (see "
            "unidiffuser_group_norm_workspace_size)", workspace_bytes, workspace, need);
    if (!aligned(workspace, 16))
        return fail(cudaErrorInvalidValue, "workspace must be 16-byte aligned");
    const int hw = h * w;
    switch (dtype)
    {
    case UD_DTYPE_FLOAT32:
        return dispatch<float>(x, gamma, beta, y, n, c, hw, pixel_stride, num_groups, eps, silu != 0, layout, pl,
            workspace, stream);
    case UD_DTYPE_FLOAT16:
        return dispatch<__half>(x, gamma, beta, y, n, c, hw, pixel_stride, num_groups, eps, silu != 0, layout, pl,
            workspace, stream);
    default:
        return dispatch<__nv_bfloat16>(x, gamma, beta, y, n, c, hw, pixel_stride, num_groups, eps, silu != 0,
            layout, pl, workspace, stream);
    }
}

extern "C" int unidiffuser_group_norm(const void* x, const void* gamma, const void* beta, void* y, int n, int c,
    int h, int w, int num_groups, float eps, int silu, int dtype, int layout, void* workspace,
    size_t workspace_bytes, cudaStream_t stream)
{
    return unidiffuser_group_norm_strided(x, gamma, beta, y, n, c, h, w, c, num_groups, eps, silu, dtype, layout,
        workspace, workspace_bytes, stream);
}

extern "C" const char* unidiffuser_group_norm_error_string(void)
{
    return tErr;
}

#ifndef UNIDIFFUSER_CUDA_ARCHS
#define UNIDIFFUSER_CUDA_ARCHS "unknown"
#endif

extern "C" const char* unidiffuser_plugins_cuda_archs(void)
{
    return UNIDIFFUSER_CUDA_ARCHS;
}

extern "C" int unidiffuser_group_norm_device_check(int device, int* binary_version, int* ptx_version)
{
    tErr[0] = '\0';
    int prev = -1;
    if (cudaGetDevice(&prev) != cudaSuccess)
        prev = -1;
    cudaError_t e = cudaSetDevice(device);
    cudaFuncAttributes attr{};
    // Loads the module for this device: fails when it holds neither SASS this GPU runs nor PTX the
    // driver can compile for it. Every kernel of the library is built for the same targets.
    if (e == cudaSuccess)
        e = cudaFuncGetAttributes(&attr, finalize<__half>);
    if (prev >= 0 && prev != device)
        cudaSetDevice(prev);
    if (e != cudaSuccess)
    {
        cudaGetLastError(); // not sticky: clear it so later calls start clean
        return fail(e, "device %d cannot run this build's kernels (built for %s): %s", device, UNIDIFFUSER_CUDA_ARCHS,
            cudaGetErrorString(e));
    }
    if (binary_version)
        *binary_version = attr.binaryVersion;
    if (ptx_version)
        *ptx_version = attr.ptxVersion;
    return 0;
}
