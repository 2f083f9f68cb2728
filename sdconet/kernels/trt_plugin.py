"""TensorRT plugin ``sdconet::MultiscaleDeformableAttn``: our Triton MSDA kernel compiled ahead of time into engines.

The plugin is a TensorRT quickly-deployable Python plugin (``tensorrt.plugin``, TensorRT >= 10.9) with an
ahead-of-time implementation: at engine build time :func:`compile_msda_kernel` compiles the Triton forward kernel
(:mod:`sdconet.kernels.msda_triton`) to PTX and TensorRT embeds it in the engine, so the engine runs without Python —
in ``trtexec`` and in Triton Inference Server's C++ TensorRT backend. Only the *build* needs Python, ``triton`` and
:func:`register_msda_plugin` called before the ONNX parser runs.

Its I/O mirrors TensorRT's built-in ``MultiscaleDeformableAttnPlugin_TRT`` exactly (DESIGN.md §5): five inputs in the
order ``value [N,S,M,D]``, ``spatial_shapes [L,2]`` int32, ``level_start_index [L]`` int32,
``sampling_locations [N,Lq,M,L,P,2]``, ``attention_weights [N,Lq,M,L,P]``; one output ``[N,Lq,M,D]``; float tensors all
FP32 or all FP16; linear layout; no plugin attributes. ``M``, ``D``, ``L`` and ``P`` must be static (they are
compile-time constants of the kernel); ``N``, ``S`` and ``Lq`` may be dynamic.

In ONNX the plugin is a node whose ``op_type`` is the plugin name, with the string attributes ``plugin_namespace`` and
``plugin_version`` and the int attribute ``aot = 1`` (TensorRT's ONNX parser then requests the AOT implementation):
:func:`make_msda_node` builds it and :func:`check_msda_node` checks a node (and, given its graph, the input types)
against the plugin signature. Everything except :func:`register_msda_plugin` works without TensorRT; ONNX helpers
need ``onnx``, kernel compilation needs ``triton`` (no GPU: pass a ``target``).
"""
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

if TYPE_CHECKING:
    import onnx

SDCONET_MSDA_NAMESPACE = "sdconet"  # TensorRT plugin namespace, also the ONNX domain of the node
SDCONET_MSDA_OP_TYPE = "MultiscaleDeformableAttn"  # TensorRT plugin name = ONNX op_type
SDCONET_MSDA_PLUGIN_ID = f"{SDCONET_MSDA_NAMESPACE}::{SDCONET_MSDA_OP_TYPE}"
SDCONET_MSDA_PLUGIN_VERSION = "1"  # tensorrt.plugin registers every Python plugin creator as version "1"
SDCONET_MSDA_OPSET_VERSION = 1
# node attributes read by TensorRT's ONNX parser to find the creator and request the AOT implementation; the parser
# passes only a creator's declared fields to it, and this plugin declares none
SDCONET_MSDA_ATTRIBUTES = {"plugin_namespace": SDCONET_MSDA_NAMESPACE, "plugin_version": SDCONET_MSDA_PLUGIN_VERSION,
                           "aot": 1}
# the names sdconet.kernels.msda_plugin.sdconet_plugin_spec() reads
PLUGIN_OP_TYPE = SDCONET_MSDA_OP_TYPE
PLUGIN_NAMESPACE = SDCONET_MSDA_NAMESPACE
PLUGIN_VERSION = SDCONET_MSDA_PLUGIN_VERSION
PLUGIN_ATTRIBUTES = SDCONET_MSDA_ATTRIBUTES
MIN_TENSORRT_VERSION = (10, 9)  # first release with ahead-of-time Python plugins
# custom tactics TensorRT times at build time: queries per kernel program (BLOCK_Q)
TACTIC_BLOCK_Q = {1: 16, 2: 32, 3: 64}
# Triton kernel scalars between the input and output pointers, in order (the AOT calling convention)
KERNEL_SCALAR_ARGS = ("batch", "num_value", "num_query")

FLOAT_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class PluginTensor:
    """One plugin input/output: name, rank, allowed dtypes (NumPy names) and layout (for messages and docs)."""

    name: str
    rank: int
    dtypes: Tuple[str, ...]
    layout: str


MSDA_PLUGIN_INPUTS = (
    PluginTensor("value", 4, FLOAT_DTYPES, "[N, S, M, D]"),
    PluginTensor("spatial_shapes", 2, ("int32",), "[L, 2]"),
    PluginTensor("level_start_index", 1, ("int32",), "[L]"),
    PluginTensor("sampling_locations", 6, FLOAT_DTYPES, "[N, Lq, M, L, P, 2]"),
    PluginTensor("attention_weights", 5, FLOAT_DTYPES, "[N, Lq, M, L, P]"),
)
MSDA_PLUGIN_OUTPUT = PluginTensor("output", 4, FLOAT_DTYPES, "[N, Lq, M, D]")
_TRT_TYPE_NAMES = {"float32": "FP32", "float16": "FP16", "int32": "INT32"}


def msda_type_combination() -> str:
    """``AutoTuneCombination`` type string: float I/O dependently FP32 or FP16, shape inputs INT32."""
    tensors = (*MSDA_PLUGIN_INPUTS, MSDA_PLUGIN_OUTPUT)
    return ", ".join("|".join(_TRT_TYPE_NAMES[d] for d in t.dtypes) for t in tensors)


# --------------------------------------------------------------------------------------------------------------------
# ONNX node
# --------------------------------------------------------------------------------------------------------------------
def make_msda_node(inputs: Sequence[str], output: str, name: Optional[str] = None,
                   domain: str = SDCONET_MSDA_NAMESPACE) -> "onnx.NodeProto":
    """ONNX node for the plugin; ``inputs`` are the five tensor names in plugin order, ``output`` is ``[N,Lq,M,D]``.

    The graph that holds it needs ``onnx.helper.make_opsetid(domain, SDCONET_MSDA_OPSET_VERSION)`` in its opset
    imports (see :func:`msda_opset_import`).
    """
    import onnx

    if len(inputs) != len(MSDA_PLUGIN_INPUTS) or not all(inputs):
        expected = ", ".join(t.name for t in MSDA_PLUGIN_INPUTS)
        raise ValueError(f"{SDCONET_MSDA_OP_TYPE} needs {len(MSDA_PLUGIN_INPUTS)} input names ({expected}), "
                         f"got {list(inputs)}")
    if not output:
        raise ValueError(f"{SDCONET_MSDA_OP_TYPE} needs an output name")
    return onnx.helper.make_node(SDCONET_MSDA_OP_TYPE, list(inputs), [output], name=name or f"{output}_msda",
                                 domain=domain, **SDCONET_MSDA_ATTRIBUTES)


def msda_opset_import(domain: str = SDCONET_MSDA_NAMESPACE) -> "onnx.OperatorSetIdProto":
    import onnx

    return onnx.helper.make_opsetid(domain, SDCONET_MSDA_OPSET_VERSION)


def _known_tensor_types(graph: "onnx.GraphProto") -> dict:
    """name -> (NumPy dtype name, shape tuple with None for symbolic dims) for every typed tensor in ``graph``."""
    import onnx

    def dtype_name(elem_type: int) -> str:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name

    types = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        tensor_type = info.type.tensor_type
        if not tensor_type.elem_type:
            continue
        shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
        types[info.name] = (dtype_name(tensor_type.elem_type), shape)
    for init in graph.initializer:
        types[init.name] = (dtype_name(init.data_type), tuple(init.dims))
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = (dtype_name(attr.t.data_type), tuple(attr.t.dims))
    return types


def check_msda_node(node: "onnx.NodeProto", graph: "Optional[onnx.GraphProto]" = None,
                    domain: str = SDCONET_MSDA_NAMESPACE) -> None:
    """Raise ``ValueError`` naming the node and the problem unless ``node`` matches the plugin signature.

    Checks op type, domain, attributes, 5 inputs and 1 output; with ``graph`` (run ONNX shape inference first for
    intermediate tensors) also each known input/output's dtype and rank, the shared float dtype, and the static
    M/L/P dimensions that TensorRT's MSDA plugins assert on.
    """
    where = f"MSDA plugin node '{node.name}'"
    if node.op_type != SDCONET_MSDA_OP_TYPE or node.domain != domain:
        raise ValueError(f"{where}: op '{node.domain}::{node.op_type}', expected '{domain}::{SDCONET_MSDA_OP_TYPE}'")
    attrs = {a.name: (a.s.decode() if a.type == a.STRING else a.i) for a in node.attribute}
    if attrs != SDCONET_MSDA_ATTRIBUTES:
        raise ValueError(f"{where}: attributes {attrs}, expected exactly {SDCONET_MSDA_ATTRIBUTES}")
    if len(node.input) != len(MSDA_PLUGIN_INPUTS) or not all(node.input):
        raise ValueError(f"{where}: {len(node.input)} inputs {list(node.input)}, expected "
                         f"{[t.name for t in MSDA_PLUGIN_INPUTS]}")
    if len(node.output) != 1:
        raise ValueError(f"{where}: {len(node.output)} outputs, expected 1 ({MSDA_PLUGIN_OUTPUT.layout})")
    if graph is None:
        return

    known = _known_tensor_types(graph)
    shapes = {}
    for spec, tensor_name in zip((*MSDA_PLUGIN_INPUTS, MSDA_PLUGIN_OUTPUT), (*node.input, node.output[0])):
        if tensor_name not in known:
            continue
        dtype, shape = known[tensor_name]
        if dtype not in spec.dtypes:
            raise ValueError(f"{where}: {spec.name} '{tensor_name}' is {dtype}, expected {' or '.join(spec.dtypes)}")
        if shape is not None and len(shape) != spec.rank:
            raise ValueError(f"{where}: {spec.name} '{tensor_name}' has rank {len(shape)}, expected {spec.rank} "
                             f"{spec.layout}")
        shapes[spec.name] = (dtype, shape)
    float_types = {spec.name: shapes[spec.name][0] for spec in (*MSDA_PLUGIN_INPUTS, MSDA_PLUGIN_OUTPUT)
                   if spec.dtypes == FLOAT_DTYPES and spec.name in shapes}
    if len(set(float_types.values())) > 1:
        raise ValueError(f"{where}: float tensors must share one dtype (all FP32 or all FP16), got {float_types}")

    def dim(tensor: str, axis: int) -> Optional[int]:
        shape = shapes.get(tensor, (None, None))[1]
        return None if shape is None else shape[axis]

    for label, dims in (("heads M", [dim("value", 2), dim("sampling_locations", 2), dim("attention_weights", 2)]),
                        ("levels L", [dim("spatial_shapes", 0), dim("level_start_index", 0),
                                      dim("sampling_locations", 3), dim("attention_weights", 3)]),
                        ("points P", [dim("sampling_locations", 4), dim("attention_weights", 4)])):
        static = {d for d in dims if d is not None}
        if len(static) > 1:
            raise ValueError(f"{where}: inputs disagree on the number of {label}: {sorted(static)}")


# --------------------------------------------------------------------------------------------------------------------
# Ahead-of-time kernel
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AOTKernel:
    """A compiled forward kernel as TensorRT's AOT plugin consumes it."""

    name: str
    ptx: str
    block_threads: int  # launch block size (threads), fixed by the kernel's num_warps
    shared_mem: int  # dynamic shared memory in bytes
    block_q: int  # queries per program: grid = (cdiv(Lq, block_q), N * M)


def strip_unused_trailing_params(ptx: str, kernel_name: str, keep: int) -> str:
    """Drop the entry parameters after the first ``keep`` from ``ptx``, provided the kernel body never reads them.

    Triton appends hidden pointer parameters (global and profile scratch memory) after the user's arguments;
    TensorRT's AOT launcher passes only inputs, extra scalars and outputs, so a kernel that still declared them would
    be launched with fewer arguments than it expects. They are unused when the kernel needs no scratch memory, which
    this function verifies before removing them.
    """
    match = re.search(rf"\.entry\s+{re.escape(kernel_name)}\s*\((.*?)\)", ptx, re.S)
    if match is None:
        raise ValueError(f"kernel entry '{kernel_name}' not found in the PTX")
    params = [p.strip() for p in match.group(1).split(",") if p.strip()]
    if len(params) < keep:
        raise ValueError(f"kernel '{kernel_name}' has {len(params)} PTX parameters, expected at least {keep}")
    body = ptx[match.end():]
    for param in params[keep:]:
        param_name = param.split()[-1]
        if re.search(rf"\b{re.escape(param_name)}\b", body):
            raise RuntimeError(f"kernel '{kernel_name}' reads its hidden parameter {param_name} (Triton scratch "
                               "memory), which TensorRT's AOT plugin launcher cannot provide")
    kept = ",\n".join(f"\t{p}" for p in params[:keep])
    return f"{ptx[:match.start(1)]}\n{kept}\n{ptx[match.end(1):]}"


def compile_msda_kernel(dtype: str, num_heads: int, head_dim: int, num_levels: int, num_points: int,
                        block_q: int = TACTIC_BLOCK_Q[1], target: "Optional[object]" = None) -> AOTKernel:
    """Compile the Triton MSDA forward kernel to PTX for TensorRT's AOT plugin.

    ``dtype`` is ``"fp32"`` or ``"fp16"`` (all float I/O). ``target`` is a ``triton.backends.compiler.GPUTarget``;
    ``None`` compiles for the current GPU (the engine-building one). Kernel parameters, in order: the five input
    pointers, the int32 scalars :data:`KERNEL_SCALAR_ARGS`, the output pointer.
    """
    import triton

    from sdconet.kernels.msda_triton import NUM_WARPS, interpreter_enabled, msda_forward_kernel

    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"MSDA plugin dtype must be 'fp32' or 'fp16', got {dtype!r}")
    if interpreter_enabled():
        raise RuntimeError("cannot compile PTX while TRITON_INTERPRET=1 (the kernels were built for the interpreter)")
    for label, value in (("num_heads", num_heads), ("head_dim", head_dim), ("num_levels", num_levels),
                         ("num_points", num_points), ("block_q", block_q)):
        if value < 1:
            raise ValueError(f"MSDA plugin {label} must be >= 1, got {value}")
    float_ptr = f"*{dtype}"
    signature = {"value_ptr": float_ptr, "spatial_shapes_ptr": "*i32", "level_start_index_ptr": "*i32",
                 "sampling_locations_ptr": float_ptr, "attention_weights_ptr": float_ptr,
                 **{name: "i32" for name in KERNEL_SCALAR_ARGS}, "out_ptr": float_ptr}
    constexprs = {"NUM_HEADS": num_heads, "HEAD_DIM": head_dim, "NUM_LEVELS": num_levels, "NUM_POINTS": num_points,
                  "BLOCK_Q": block_q, "BLOCK_D": triton.next_power_of_2(head_dim)}
    signature.update({name: "constexpr" for name in constexprs})
    source = triton.compiler.ASTSource(fn=msda_forward_kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=target, options={"num_warps": NUM_WARPS})
    metadata = compiled.metadata
    for scratch in ("global_scratch_size", "profile_scratch_size"):
        if getattr(metadata, scratch, 0):
            raise RuntimeError(f"the MSDA kernel needs Triton {scratch.replace('_', ' ')} = "
                               f"{getattr(metadata, scratch)}, which TensorRT's AOT launcher cannot provide")
    num_params = len(signature) - len(constexprs)
    ptx = strip_unused_trailing_params(compiled.asm["ptx"], metadata.name, keep=num_params)
    return AOTKernel(name=metadata.name, ptx=ptx, block_threads=metadata.num_warps * 32, shared_mem=metadata.shared,
                     block_q=block_q)


# --------------------------------------------------------------------------------------------------------------------
# TensorRT registration
# --------------------------------------------------------------------------------------------------------------------
def tensorrt_unavailable_reason() -> Optional[str]:
    """Why :func:`register_msda_plugin` cannot work here, or ``None`` when it can."""
    from sdconet.utils.tensorrt import TensorRTUnavailable, import_tensorrt

    try:
        tensorrt = import_tensorrt()
        import tensorrt.plugin as trtp
    except TensorRTUnavailable as err:
        return f"{err} (the {SDCONET_MSDA_PLUGIN_ID} plugin needs tensorrt >= {_version_text(MIN_TENSORRT_VERSION)})"
    except Exception as err:  # noqa: BLE001 - tensorrt.plugin imports optional modules of its own
        return f"tensorrt.plugin not importable ({type(err).__name__}: {err})"
    version = tuple(int(part) for part in re.findall(r"\d+", tensorrt.__version__)[:2])
    if version < MIN_TENSORRT_VERSION or not hasattr(trtp, "aot_impl"):
        return (f"tensorrt {tensorrt.__version__} has no ahead-of-time Python plugins "
                f"(needs >= {_version_text(MIN_TENSORRT_VERSION)})")
    return None


def _version_text(version: Tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def ptx_facts(ptx: str) -> dict:
    """``{"ptx_version": "8.7", "ptx_target": "sm_90a"}`` from a PTX module's ``.version``/``.target`` directives.

    A driver loads PTX only up to the ISA version it knows, so these decide whether an engine embedding the kernel
    runs on an older Jetson or container driver than the build machine's.
    """
    version = re.search(r"^\s*\.version\s+(\d+\.\d+)", ptx, re.M)
    target = re.search(r"^\s*\.target\s+([\w, ]+?)\s*$", ptx, re.M)
    if version is None or target is None:
        raise ValueError("PTX without a .version or .target directive")
    return {"ptx_version": version.group(1), "ptx_target": target.group(1).split(",")[0].strip(),
            "min_driver_cuda": PTX_MIN_DRIVER_CUDA.get(version.group(1))}


# PTX ISA version -> first CUDA (driver) release that loads it (PTX ISA release history; None = not in this table)
PTX_MIN_DRIVER_CUDA = {"8.0": "12.0", "8.1": "12.1", "8.2": "12.2", "8.3": "12.3", "8.4": "12.4", "8.5": "12.5",
                       "8.6": "12.7", "8.7": "12.8", "8.8": "12.9", "9.0": "13.0", "9.1": "13.1"}


# (dtype, block_q) -> facts of each kernel compiled by the plugin in this process (kernel name, PTX version/target,
# launch block, shared memory); sdconet.deploy.tensorrt_build records them in the engine's .plan.json
compiled_kernel_facts: Dict[Tuple[str, int], dict] = {}


_registered = False


def register_msda_plugin() -> None:
    """Register ``sdconet::MultiscaleDeformableAttn`` with TensorRT (idempotent); call before parsing the ONNX."""
    global _registered
    if _registered:
        return
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise ImportError(f"cannot register the {SDCONET_MSDA_PLUGIN_ID} TensorRT plugin: {reason}")
    from sdconet.utils.tensorrt import import_tensorrt

    trt = import_tensorrt()
    import tensorrt.plugin as trtp

    kernel_dtypes = {trt.float32: "fp32", trt.float16: "fp16"}

    def static_dim(desc: "trtp.TensorDesc", axis: int, label: str) -> int:
        # the symbolic shape: at build time desc.shape may be a placeholder, shape_expr says whether a dim is constant
        expr = desc.shape_expr[axis]
        if not expr.is_constant:
            raise ValueError(f"{SDCONET_MSDA_PLUGIN_ID}: {label} must be a static dimension (it is a compile-time "
                             "constant of the kernel); export the model at a fixed input size")
        # constant_value() is a method in tensorrt.plugin (is_constant is the property); reading it as an attribute
        # gave int(<bound method>) -> TypeError inside aot_impl, and build_serialized_network returned None
        return int(expr.constant_value())

    # The signatures below are what tensorrt.plugin validates: tensor arguments named and ordered as
    # MSDA_PLUGIN_INPUTS, real (not postponed) annotations.
    @trtp.register(SDCONET_MSDA_PLUGIN_ID)
    def msda_plugin_desc(value: trtp.TensorDesc, spatial_shapes: trtp.TensorDesc, level_start_index: trtp.TensorDesc,
                         sampling_locations: trtp.TensorDesc, attention_weights: trtp.TensorDesc) -> trtp.TensorDesc:
        shape = (value.shape_expr[0], sampling_locations.shape_expr[1], value.shape_expr[2], value.shape_expr[3])
        return trtp.from_shape_expr(shape, dtype=value.dtype)

    @trtp.autotune(SDCONET_MSDA_PLUGIN_ID)
    def msda_plugin_autotune(value: trtp.TensorDesc, spatial_shapes: trtp.TensorDesc,
                             level_start_index: trtp.TensorDesc, sampling_locations: trtp.TensorDesc,
                             attention_weights: trtp.TensorDesc,
                             outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(msda_type_combination(), "LINEAR", sorted(TACTIC_BLOCK_Q))]

    @trtp.aot_impl(SDCONET_MSDA_PLUGIN_ID)
    def msda_plugin_aot_impl(
        value: trtp.TensorDesc, spatial_shapes: trtp.TensorDesc, level_start_index: trtp.TensorDesc,
        sampling_locations: trtp.TensorDesc, attention_weights: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc],
        tactic: int,
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        num_heads = static_dim(value, 2, "value heads M")
        kernel = compile_msda_kernel(
            kernel_dtypes[value.dtype], num_heads=num_heads, head_dim=static_dim(value, 3, "value channels D"),
            num_levels=static_dim(sampling_locations, 3, "levels L"),
            num_points=static_dim(sampling_locations, 4, "points P"),
            block_q=TACTIC_BLOCK_Q.get(tactic, TACTIC_BLOCK_Q[1]))
        compiled_kernel_facts[(kernel_dtypes[value.dtype], kernel.block_q)] = {
            "kernel": kernel.name, **ptx_facts(kernel.ptx), "block_threads": kernel.block_threads,
            "shared_mem": kernel.shared_mem}
        batch, num_value, num_query = value.shape_expr[0], value.shape_expr[1], sampling_locations.shape_expr[1]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(num_query, kernel.block_q)
        launch.grid_y = batch * num_heads
        launch.block_x = kernel.block_threads
        launch.shared_mem = kernel.shared_mem
        scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (batch, num_value, num_query)])
        return kernel.name, kernel.ptx, launch, scalars

    _registered = True
