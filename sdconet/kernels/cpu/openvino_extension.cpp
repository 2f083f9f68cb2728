// OpenVINO extension: the fused MSDA op (sdconet::MultiscaleDeformableAttn) and ONNX frontend conversions that map
// the plugin-mode ONNX nodes to it, so one exported file serves TensorRT and the CPU runtime.
//
// ONNX nodes mapped: MultiscaleDeformableAttnPlugin_TRT (domain trt.plugins, TensorRT's built-in plugin as
// sdconet/deploy/msda_plugin.py exports it) and MultiscaleDeformableAttn (domain sdconet, our own TensorRT plugin).
// Their attributes (plugin_version, plugin_namespace, aot) only concern TensorRT and are ignored.
//
// Also exports a C entry point (sdconet_msda_forward_f32) so that tests and the op benchmark can call the kernel on
// NumPy arrays without building a graph.
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "msda_cpu.hpp"
#include "openvino/core/extension.hpp"
#include "openvino/core/op_extension.hpp"
#include "openvino/core/type/bfloat16.hpp"
#include "openvino/core/type/float16.hpp"
#include "openvino/frontend/extension/conversion.hpp"
#include "openvino/frontend/node_context.hpp"
#include "openvino/frontend/onnx/extension/conversion.hpp"
#include "openvino/op/op.hpp"

namespace sdconet {

class MultiscaleDeformableAttn : public ov::op::Op {
public:
    OPENVINO_OP("MultiscaleDeformableAttn", "sdconet");

    MultiscaleDeformableAttn() = default;
    explicit MultiscaleDeformableAttn(const ov::OutputVector& args) : Op(args) { constructor_validate_and_infer_types(); }

    // output [N, Lq, M, D] in value's element type
    void validate_and_infer_types() override {
        NODE_VALIDATION_CHECK(this, get_input_size() == 5, "MSDA takes 5 inputs (value, spatial_shapes, "
                              "level_start_index, sampling_locations, attention_weights), got ", get_input_size());
        const auto& value = get_input_partial_shape(0);
        const auto& locations = get_input_partial_shape(3);
        for (size_t i : {0, 3, 4}) {
            const auto type = get_input_element_type(i);
            NODE_VALIDATION_CHECK(this, type.is_dynamic() || type == ov::element::f32 || type == ov::element::f16 ||
                                  type == ov::element::bf16, "MSDA input ", i, " must be f32, f16 or bf16, got ",
                                  type);
        }
        // every dimension the kernel derives a stride or a loop bound from must agree between the inputs: a graph
        // where they do not would make the kernel read past a tensor (dynamic dimensions are checked in evaluate)
        const auto& weights = get_input_partial_shape(4);
        const auto& level_hw = get_input_partial_shape(1);
        const auto& level_start = get_input_partial_shape(2);
        NODE_VALIDATION_CHECK(this, value.rank().compatible(4), "MSDA value must be [N, S, M, D], got ", value);
        NODE_VALIDATION_CHECK(this, locations.rank().compatible(6),
                              "MSDA sampling_locations must be [N, Lq, M, L, P, 2], got ", locations);
        NODE_VALIDATION_CHECK(this, weights.rank().compatible(5),
                              "MSDA attention_weights must be [N, Lq, M, L, P], got ", weights);
        if (locations.rank().is_static()) {
            NODE_VALIDATION_CHECK(this, locations[5].compatible(2), "MSDA sampling_locations must end in 2 (x, y), "
                                  "got ", locations);
            if (value.rank().is_static())
                NODE_VALIDATION_CHECK(this, locations[0].compatible(value[0]) && locations[2].compatible(value[2]),
                                      "MSDA sampling_locations ", locations, " does not match value ", value,
                                      " (batch N and heads M must agree)");
            if (weights.rank().is_static())
                for (int64_t i = 0; i < 5; ++i)
                    NODE_VALIDATION_CHECK(this, weights[i].compatible(locations[i]), "MSDA attention_weights ",
                                          weights, " does not match sampling_locations ", locations,
                                          " (must be its first 5 dimensions: N, Lq, M, L, P)");
            if (level_hw.rank().is_static())
                NODE_VALIDATION_CHECK(this, level_hw.rank().get_length() == 2 && level_hw[0].compatible(locations[3]) &&
                                      level_hw[1].compatible(2), "MSDA spatial_shapes must be [L, 2] with L = ",
                                      locations[3], " levels of sampling_locations, got ", level_hw);
            if (level_start.rank().is_static())
                NODE_VALIDATION_CHECK(this, level_start.rank().get_length() == 1 &&
                                      level_start[0].compatible(locations[3]), "MSDA level_start_index must be [L] "
                                      "with L = ", locations[3], " levels of sampling_locations, got ", level_start);
        }
        ov::PartialShape out = ov::PartialShape::dynamic(4);
        if (value.rank().is_static() && locations.rank().is_static())
            out = ov::PartialShape{value[0], locations[1], value[2], value[3]};
        set_output_type(0, get_input_element_type(0), out);
    }

    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
        return std::make_shared<MultiscaleDeformableAttn>(args);
    }

    bool visit_attributes(ov::AttributeVisitor&) override { return true; }

    bool has_evaluate() const override { return true; }

    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
        const ov::Shape& value_shape = inputs[0].get_shape();
        const ov::Shape& loc_shape = inputs[3].get_shape();
        check_shapes(value_shape, loc_shape, inputs[4].get_shape());
        const int64_t levels = static_cast<int64_t>(loc_shape[3]);
        std::vector<int64_t> level_hw = as_int64(inputs[1], 2 * levels, "spatial_shapes");
        std::vector<int64_t> level_start = as_int64(inputs[2], levels, "level_start_index");

        // reduced-precision inputs (bf16/f16 inference) are widened here: the kernel accumulates in f32
        std::vector<float> value_buf, loc_buf, attn_buf, out_buf;
        MsdaProblem pb{};
        pb.value = as_f32(inputs[0], value_buf);
        pb.sampling_locations = as_f32(inputs[3], loc_buf);
        pb.attention_weights = as_f32(inputs[4], attn_buf);
        pb.level_hw = level_hw.data();
        pb.level_start = level_start.data();
        pb.batch = static_cast<int64_t>(value_shape[0]);
        pb.tokens = static_cast<int64_t>(value_shape[1]);
        pb.heads = static_cast<int64_t>(value_shape[2]);
        pb.channels = static_cast<int64_t>(value_shape[3]);
        pb.queries = static_cast<int64_t>(loc_shape[1]);
        pb.levels = levels;
        pb.points = static_cast<int64_t>(loc_shape[4]);

        ov::Tensor& out = outputs[0];
        out.set_shape({value_shape[0], loc_shape[1], value_shape[2], value_shape[3]});
        const bool direct = out.get_element_type() == ov::element::f32;
        if (!direct) out_buf.resize(out.get_size());
        pb.output = direct ? out.data<float>() : out_buf.data();
        msda_forward(pb, select_isa());
        if (!direct) narrow_from_f32(out_buf, out);
        return true;
    }

private:
    // The shapes of the tensors actually passed (dynamic dimensions resolved): the kernel indexes all three with
    // value's batch/heads and the locations' levels/points, so any disagreement is refused before it runs.
    static void check_shapes(const ov::Shape& value, const ov::Shape& locations, const ov::Shape& weights) {
        bool ok = value.size() == 4 && locations.size() == 6 && weights.size() == 5 && locations[5] == 2 &&
                  locations[0] == value[0] && locations[2] == value[2];
        for (size_t i = 0; ok && i < 5; ++i) ok = weights[i] == locations[i];
        if (!ok) {
            std::ostringstream msg;
            msg << "MSDA: input shapes do not match: value " << value << " (expected [N, S, M, D]), "
                << "sampling_locations " << locations << " (expected [N, Lq, M, L, P, 2] with value's N and M), "
                << "attention_weights " << weights << " (expected [N, Lq, M, L, P] as sampling_locations)";
            throw std::runtime_error(msg.str());
        }
    }

    static std::vector<int64_t> as_int64(const ov::Tensor& t, int64_t expected, const char* name) {
        if (static_cast<int64_t>(t.get_size()) != expected)
            throw std::runtime_error(std::string("MSDA: ") + name + " has " + std::to_string(t.get_size()) +
                                     " values, expected " + std::to_string(expected));
        std::vector<int64_t> result(expected);
        const auto type = t.get_element_type();
        for (int64_t i = 0; i < expected; ++i) {
            if (type == ov::element::i32) result[i] = t.data<const int32_t>()[i];
            else if (type == ov::element::i64) result[i] = t.data<const int64_t>()[i];
            else throw std::runtime_error(std::string("MSDA: ") + name + " must be i32 or i64");
        }
        return result;
    }

    static const float* as_f32(const ov::Tensor& t, std::vector<float>& buffer) {
        const auto type = t.get_element_type();
        if (type == ov::element::f32) return t.data<const float>();
        buffer.resize(t.get_size());
        if (type == ov::element::bf16) {
            const auto* src = t.data<const ov::bfloat16>();
            for (size_t i = 0; i < buffer.size(); ++i) buffer[i] = static_cast<float>(src[i]);
        } else if (type == ov::element::f16) {
            const auto* src = t.data<const ov::float16>();
            for (size_t i = 0; i < buffer.size(); ++i) buffer[i] = static_cast<float>(src[i]);
        } else {
            throw std::runtime_error("MSDA: float inputs must be f32, f16 or bf16, got " + type.get_type_name());
        }
        return buffer.data();
    }

    static void narrow_from_f32(const std::vector<float>& src, ov::Tensor& out) {
        const auto type = out.get_element_type();
        if (type == ov::element::bf16) {
            auto* dst = out.data<ov::bfloat16>();
            for (size_t i = 0; i < src.size(); ++i) dst[i] = ov::bfloat16(src[i]);
        } else if (type == ov::element::f16) {
            auto* dst = out.data<ov::float16>();
            for (size_t i = 0; i < src.size(); ++i) dst[i] = ov::float16(src[i]);
        } else {
            throw std::runtime_error("MSDA: output must be f32, f16 or bf16, got " + type.get_type_name());
        }
    }
};

namespace {
ov::OutputVector convert_plugin_node(const ov::frontend::NodeContext& node) {
    if (node.get_input_size() != 5)
        throw std::runtime_error("MSDA plugin node must have 5 inputs, got " + std::to_string(node.get_input_size()));
    ov::OutputVector args;
    for (int i = 0; i < 5; ++i) args.push_back(node.get_input(i));
    return std::make_shared<MultiscaleDeformableAttn>(args)->outputs();
}
}  // namespace

}  // namespace sdconet

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>({
    std::make_shared<ov::OpExtension<sdconet::MultiscaleDeformableAttn>>(),
    std::make_shared<ov::frontend::onnx::ConversionExtension>("MultiscaleDeformableAttnPlugin_TRT", "trt.plugins",
                                                              sdconet::convert_plugin_node),
    std::make_shared<ov::frontend::onnx::ConversionExtension>("MultiscaleDeformableAttn", "sdconet",
                                                              sdconet::convert_plugin_node),
}));

// ---- C entry points (ctypes): kernel on f32 arrays, and the ISA it would run on --------------------------------
extern "C" {

// Returns 0 on success; on failure writes the reason into `error` (at most `error_size` bytes) and returns 1.
__attribute__((visibility("default"))) int sdconet_msda_forward_f32(
    const float* value, const int64_t* level_hw, const int64_t* level_start, const float* sampling_locations,
    const float* attention_weights, float* output, int64_t batch, int64_t tokens, int64_t heads, int64_t channels,
    int64_t queries, int64_t levels, int64_t points, char* error, size_t error_size) {
    try {
        sdconet::MsdaProblem pb{value, sampling_locations, attention_weights, output, level_hw, level_start,
                                batch, tokens, heads, channels, queries, levels, points};
        sdconet::msda_forward(pb, sdconet::select_isa());
        return 0;
    } catch (const std::exception& err) {
        if (error != nullptr && error_size > 0) {
            std::strncpy(error, err.what(), error_size - 1);
            error[error_size - 1] = '\0';
        }
        return 1;
    }
}

// The ISA the next call runs on ("avx512", "avx2", "scalar"), or the SDCONET_CPU_ISA error message.
__attribute__((visibility("default"))) const char* sdconet_msda_isa() {
    static thread_local std::string answer;
    try {
        answer = sdconet::isa_name(sdconet::select_isa());
    } catch (const std::exception& err) {
        answer = std::string("error: ") + err.what();
    }
    return answer.c_str();
}

// 1 when this CPU can run `name` (avx512|avx2|scalar), else 0.
__attribute__((visibility("default"))) int sdconet_msda_cpu_supports(const char* name) {
    const std::string isa(name);
    if (isa == "avx512") return sdconet::cpu_supports(sdconet::Isa::Avx512);
    if (isa == "avx2") return sdconet::cpu_supports(sdconet::Isa::Avx2);
    return isa == "scalar";
}
}
