// Fused MSDA forward: scalar, AVX2+FMA and AVX-512 paths in one binary, chosen at run time (see msda_cpu.hpp).
//
// Work item = one (batch, query, head) triple. For each item the bilinear corners of all L * P sampling points are
// computed once (token offset + weight = bilinear weight * attention weight, out-of-map corners dropped), then the
// D channels are accumulated in registers, D being contiguous in both value and output.
#include "msda_cpu.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "openvino/core/parallel.hpp"

#if defined(__x86_64__) || defined(__i386__)
#    define SDCONET_X86 1
#    include <immintrin.h>
#else
#    define SDCONET_X86 0
#endif

namespace sdconet {
namespace {

// Corners of one work item: offsets into `value` (elements) and their weights.
struct Corners {
    std::vector<int64_t> offset;
    std::vector<float> weight;
    int64_t count = 0;
};

// Bilinear corners of every sampling point of item (n, q, m). Same arithmetic as msda_gather: pixel = loc * size -
// 0.5, corner weight = (wx * wy) * attention, corners outside the map skipped.
void gather_corners(const MsdaProblem& pb, int64_t item, Corners& c) {
    const int64_t m = item % pb.heads;
    const int64_t n = item / (pb.heads * pb.queries);
    const float* loc = pb.sampling_locations + item * pb.levels * pb.points * 2;
    const float* attn = pb.attention_weights + item * pb.levels * pb.points;
    const int64_t token_stride = pb.heads * pb.channels;
    const int64_t base = n * pb.tokens * token_stride + m * pb.channels;
    c.count = 0;
    for (int64_t l = 0; l < pb.levels; ++l) {
        const int64_t h = pb.level_hw[2 * l], w = pb.level_hw[2 * l + 1];
        const int64_t level_base = base + pb.level_start[l] * token_stride;
        for (int64_t p = 0; p < pb.points; ++p, loc += 2, ++attn) {
            const float x = loc[0] * static_cast<float>(w) - 0.5f;
            const float y = loc[1] * static_cast<float>(h) - 0.5f;
            // all four corners outside (also rejects NaN, and keeps the int conversion below in range)
            if (!(x > -1.0f && x < static_cast<float>(w) && y > -1.0f && y < static_cast<float>(h))) continue;
            const float x0f = std::floor(x), y0f = std::floor(y);
            const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
            const float fx = x - x0f, fy = y - y0f;
            const float a = *attn;
            // branch-free: all four corners are kept, an outside one with weight 0 and a clamped (valid) offset;
            // the data-dependent inside tests would otherwise mispredict on every other point
            const float in_x0 = x0 >= 0 ? 1.0f : 0.0f, in_x1 = x0 + 1 < w ? 1.0f : 0.0f;
            const float in_y0 = y0 >= 0 ? 1.0f : 0.0f, in_y1 = y0 + 1 < h ? 1.0f : 0.0f;
            const int64_t cx0 = std::max<int64_t>(x0, 0), cx1 = std::min<int64_t>(x0 + 1, w - 1);
            const int64_t cy0 = std::max<int64_t>(y0, 0), cy1 = std::min<int64_t>(y0 + 1, h - 1);
            const float wx0 = (1.0f - fx) * in_x0, wx1 = fx * in_x1;
            const float wy0 = (1.0f - fy) * in_y0, wy1 = fy * in_y1;
            int64_t* offset = c.offset.data() + c.count;
            float* weight = c.weight.data() + c.count;
            offset[0] = level_base + (cy0 * w + cx0) * token_stride;
            offset[1] = level_base + (cy0 * w + cx1) * token_stride;
            offset[2] = level_base + (cy1 * w + cx0) * token_stride;
            offset[3] = level_base + (cy1 * w + cx1) * token_stride;
            weight[0] = (wx0 * wy0) * a;
            weight[1] = (wx1 * wy0) * a;
            weight[2] = (wx0 * wy1) * a;
            weight[3] = (wx1 * wy1) * a;
            c.count += 4;
        }
    }
}

// Channels [d0, d1) of one item, plain C++ (the path that builds anywhere).
void accumulate_scalar(const float* value, const Corners& c, float* out, int64_t d0, int64_t d1) {
    for (int64_t d = d0; d < d1; ++d) out[d] = 0.0f;
    for (int64_t k = 0; k < c.count; ++k) {
        const float* v = value + c.offset[k];
        const float wk = c.weight[k];
        for (int64_t d = d0; d < d1; ++d) out[d] += wk * v[d];
    }
}

#if SDCONET_X86
// NV vectors of 8 channels starting at d0, accumulators held in registers across all corners.
template <int NV>
__attribute__((target("avx2,fma"))) void block_avx2(const float* value, const Corners& c, float* out, int64_t d0) {
    __m256 acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = _mm256_setzero_ps();
    for (int64_t k = 0; k < c.count; ++k) {
        const float* src = value + c.offset[k] + d0;
        const __m256 wk = _mm256_set1_ps(c.weight[k]);
        for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(wk, _mm256_loadu_ps(src + 8 * v), acc[v]);
    }
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out + d0 + 8 * v, acc[v]);
}

__attribute__((target("avx2,fma"))) void accumulate_avx2(const float* value, const Corners& c, float* out,
                                                         int64_t channels) {
    int64_t d = 0;
    for (; d + 32 <= channels; d += 32) block_avx2<4>(value, c, out, d);
    switch ((channels - d) / 8) {
        case 3: block_avx2<3>(value, c, out, d); d += 24; break;
        case 2: block_avx2<2>(value, c, out, d); d += 16; break;
        case 1: block_avx2<1>(value, c, out, d); d += 8; break;
        default: break;
    }
    if (d < channels) accumulate_scalar(value, c, out, d, channels);
}

// NV vectors of 16 channels; the last vector may be partial (mask), so no scalar tail is needed.
template <int NV>
__attribute__((target("avx512f"))) void block_avx512(const float* value, const Corners& c, float* out, int64_t d0,
                                                     __mmask16 last_mask) {
    __m512 acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < c.count; ++k) {
        const float* src = value + c.offset[k] + d0;
        const __m512 wk = _mm512_set1_ps(c.weight[k]);
        for (int v = 0; v < NV - 1; ++v) acc[v] = _mm512_fmadd_ps(wk, _mm512_loadu_ps(src + 16 * v), acc[v]);
        acc[NV - 1] = _mm512_fmadd_ps(wk, _mm512_maskz_loadu_ps(last_mask, src + 16 * (NV - 1)), acc[NV - 1]);
    }
    for (int v = 0; v < NV - 1; ++v) _mm512_storeu_ps(out + d0 + 16 * v, acc[v]);
    _mm512_mask_storeu_ps(out + d0 + 16 * (NV - 1), last_mask, acc[NV - 1]);
}

__attribute__((target("avx512f"))) void accumulate_avx512(const float* value, const Corners& c, float* out,
                                                          int64_t channels) {
    int64_t d = 0;
    for (; d + 64 <= channels; d += 64) block_avx512<4>(value, c, out, d, 0xFFFF);
    const int64_t rest = channels - d;
    if (rest == 0) return;
    const int64_t vectors = (rest + 15) / 16;
    const int tail = static_cast<int>(rest - 16 * (vectors - 1));
    const __mmask16 mask = static_cast<__mmask16>((1u << tail) - 1u);
    switch (vectors) {
        case 4: block_avx512<4>(value, c, out, d, mask); break;
        case 3: block_avx512<3>(value, c, out, d, mask); break;
        case 2: block_avx512<2>(value, c, out, d, mask); break;
        default: block_avx512<1>(value, c, out, d, mask); break;
    }
}
#endif

Isa parse_isa(const char* text) {
    const std::string name(text);
    if (name == "scalar") return Isa::Scalar;
    if (name == "avx2") return Isa::Avx2;
    if (name == "avx512") return Isa::Avx512;
    throw std::runtime_error("SDCONET_CPU_ISA='" + name + "' is not one of avx512, avx2, scalar");
}

}  // namespace

bool cpu_supports(Isa isa) {
#if SDCONET_X86
    switch (isa) {
        case Isa::Scalar: return true;
        case Isa::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        case Isa::Avx512: return __builtin_cpu_supports("avx512f");
    }
    return false;
#else
    return isa == Isa::Scalar;
#endif
}

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::Avx512: return "avx512";
        case Isa::Avx2: return "avx2";
        default: return "scalar";
    }
}

Isa select_isa() {
    // read on every call (a getenv per op call is negligible) so that tests can switch paths in one process
    const char* forced = std::getenv("SDCONET_CPU_ISA");
    if (forced != nullptr && *forced != '\0') {
        const Isa isa = parse_isa(forced);
        if (!cpu_supports(isa))
            throw std::runtime_error(std::string("SDCONET_CPU_ISA=") + forced +
                                     " but this CPU does not support it (unset it to use the best supported path)");
        return isa;
    }
    if (cpu_supports(Isa::Avx512)) return Isa::Avx512;
    if (cpu_supports(Isa::Avx2)) return Isa::Avx2;
    return Isa::Scalar;
}

void check_problem(const MsdaProblem& pb) {
    for (int64_t l = 0; l < pb.levels; ++l) {
        const int64_t h = pb.level_hw[2 * l], w = pb.level_hw[2 * l + 1], start = pb.level_start[l];
        if (h <= 0 || w <= 0 || start < 0 || start + h * w > pb.tokens)
            throw std::runtime_error("MSDA: level " + std::to_string(l) + " (H=" + std::to_string(h) + ", W=" +
                                     std::to_string(w) + ", start " + std::to_string(start) +
                                     ") does not fit value's " + std::to_string(pb.tokens) + " tokens");
    }
}

void msda_forward(const MsdaProblem& pb, Isa isa) {
    check_problem(pb);
    const int64_t items = pb.batch * pb.queries * pb.heads;
    const int64_t max_corners = pb.levels * pb.points * 4;
    ov::parallel_nt(0, [&](const int thread, const int threads) {
        int64_t begin = 0, end = 0;
        ov::splitter(items, threads, thread, begin, end);
        Corners corners;
        corners.offset.resize(max_corners);
        corners.weight.resize(max_corners);
        for (int64_t item = begin; item < end; ++item) {
            gather_corners(pb, item, corners);
            float* out = pb.output + item * pb.channels;
            switch (isa) {
#if SDCONET_X86
                case Isa::Avx512: accumulate_avx512(pb.value, corners, out, pb.channels); break;
                case Isa::Avx2: accumulate_avx2(pb.value, corners, out, pb.channels); break;
#endif
                default: accumulate_scalar(pb.value, corners, out, 0, pb.channels); break;
            }
        }
    });
}

}  // namespace sdconet
