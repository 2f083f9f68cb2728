// Fused multi-scale deformable attention (MSDA) forward for x86 CPUs: one pass over the sampling points, no
// intermediate tensors. Layout and sampling convention = sdconet/ops/msda.py (TensorRT's
// MultiscaleDeformableAttnPlugin_TRT):
//   value               [N, S, M, D]
//   spatial_shapes      [L, 2]  (H_l, W_l)
//   level_start_index   [L]     first token of level l in S
//   sampling_locations  [N, Lq, M, L, P, 2]  normalised (x, y); x maps to pixel x * W - 0.5
//   attention_weights   [N, Lq, M, L, P]
//   output              [N, Lq, M, D]
// Corners outside a level's map contribute zero (grid_sample, align_corners=False, padding_mode="zeros").
#pragma once

#include <cstdint>
#include <string>

namespace sdconet {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

struct MsdaProblem {
    const float* value;
    const float* sampling_locations;
    const float* attention_weights;
    float* output;
    const int64_t* level_hw;     // [L, 2]
    const int64_t* level_start;  // [L]
    int64_t batch, tokens, heads, channels, queries, levels, points;
};

// The ISA the kernel runs on: SDCONET_CPU_ISA (avx512|avx2|scalar) when set, else the best this CPU supports.
// Throws std::runtime_error for an unknown value or an ISA this CPU lacks.
Isa select_isa();
const char* isa_name(Isa isa);
bool cpu_supports(Isa isa);

// Checks the level table against the problem sizes (throws std::runtime_error naming the bad value).
void check_problem(const MsdaProblem& problem);

// Runs the forward pass on `isa`, multi-threaded over batch x query x head with OpenVINO's parallel API (inside an
// OpenVINO inference the thread count is the compiled model's INFERENCE_NUM_THREADS).
void msda_forward(const MsdaProblem& problem, Isa isa);

}  // namespace sdconet
