"""The CPU serving runtimes as benchmark contenders, for any transformers encoder.

An encoder here is a transformers model whose forward takes some of ``input_ids``,
``attention_mask`` and ``token_type_ids`` and returns ``last_hidden_state`` (ALBERT, BERT,
RoBERTa, MiniLM, ...). :func:`export_onnx` writes it as an ONNX file with dynamic batch and
length; the contenders built from that file:

  onnxruntime fp32    the onnxruntime.transformers BERT optimizer (its fusions) when it works for
                      the graph ("(bert fusions)"), else the exported graph ("(graph opt all)");
                      ORT_ENABLE_ALL graph optimizations either way
  onnxruntime int8    ``onnxruntime.quantization.quantize_dynamic`` of the exported file with
                      its default settings (int8 weights, activations quantized at run time), as
                      users run it (on the optimizer's output it fails: its fused operators
                      defeat the quantizer's shape inference)
  openvino (default)  ``openvino.convert_model`` of the ONNX file, compiled for CPU at OpenVINO's
                      default precision: bf16 on CPUs with AMX / AVX512-BF16. The precision it
                      ran is read back from ``INFERENCE_PRECISION_HINT`` (the row's note)
  openvino f32        the same, compiled with ``{"INFERENCE_PRECISION_HINT": "f32"}``
  openvino int8       ``nncf.quantize`` (post-training int8 of weights and activations,
                      ``model_type=TRANSFORMER``) on calibration inputs the caller gives, compiled
                      at the default precision; only when ``nncf`` is importable

Each runtime runs on as many threads as torch (``torch.get_num_threads()`` when it is built:
ORT's ``intra_op_num_threads``, OpenVINO's ``INFERENCE_NUM_THREADS``), so that a 1-thread
comparison is one. Every contender is a :class:`Runtime`: ``run(inputs)`` maps a dict of int64 CPU tensors (the
input names of the export) to ``last_hidden_state`` as a float32 tensor. A runtime whose package
is missing, or whose build fails, comes back with ``run=None`` and ``skip`` saying why; nothing
raises. The outputs are not checked here: the benchmarks compare every contender with
transformers before timing it.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

Inputs = dict          # input name -> int64 CPU tensor [batch, length]


@dataclass
class Runtime:
    """One serving-runtime contender. run: inputs -> last_hidden_state [B, L, H] float32 (None
    when skipped); skip: why it is not run; note: what it ran (precision, fusions)."""
    name: str
    run: Optional[Callable[[Inputs], torch.Tensor]] = None
    skip: Optional[str] = None
    note: str = ""


class _LastHiddenState(torch.nn.Module):
    """`model` with positional inputs in `input_names`' order, returning last_hidden_state."""

    def __init__(self, model: torch.nn.Module, input_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)

    def forward(self, *inputs):
        out = self.model(**dict(zip(self.input_names, inputs)))
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _torchscript_export(wrapped, example, names, path) -> None:
    # quiet: the legacy exporter's deprecation notice, and the tracer's notes on values it turns
    # into constants (every runtime's output is checked against transformers before timing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(wrapped, example, path, dynamo=False, opset_version=17,
                          input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "seq"}
                                        for n in names + ["last_hidden_state"]})


def max_length(config) -> int:
    """The longest input a transformers encoder config allows: max_position_embeddings, less
    the padding_idx + 1 offset of RoBERTa-style position ids; 512 when the config has none."""
    n = getattr(config, "max_position_embeddings", None) or 512
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        n -= (config.pad_token_id or 0) + 1
    return int(n)


def _dynamo_export(wrapped, example, names, path) -> None:
    # the length's upper bound must hold for the model (its position embeddings), or
    # torch.export's shape constraints fail
    longest = max_length(getattr(wrapped.model, "config", None))
    batch, seq = torch.export.Dim("batch", max=1024), torch.export.Dim("seq", max=longest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, example, path, dynamo=True, input_names=names,
                          output_names=["last_hidden_state"],
                          # one entry: forward's *inputs, a tuple of the inputs' shapes
                          dynamic_shapes=(tuple({0: batch, 1: seq} for _ in names),))


EXPORTERS = {"torchscript": _torchscript_export, "dynamo": _dynamo_export}


def export_onnx(model: torch.nn.Module, example: Inputs, path: str,
                exporters: Sequence[str] = ("dynamo", "torchscript")) -> str:
    """Write `model` (a transformers encoder, eval mode) to the ONNX file `path` with inputs
    ``example``'s keys (int64 [batch, length] tensors, e.g. input_ids, attention_mask,
    token_type_ids) and output last_hidden_state, batch and length dynamic. Tries the exporters
    in order ("dynamo": torch.export based; "torchscript": the tracer, which turns transformers'
    attention-mask arithmetic into constants of the traced shapes, so it is only right for models
    exported without an attention_mask) and returns the name of the one that worked. Raises the
    last exporter's error when none works; ValueError for an unknown exporter name."""
    unknown = [e for e in exporters if e not in EXPORTERS]
    if unknown or not exporters:
        raise ValueError(f"exporters must be among {sorted(EXPORTERS)}, got {list(exporters)}")
    names = list(example)
    wrapped = _LastHiddenState(model, names).eval()
    args = tuple(example[n] for n in names)
    error: Optional[BaseException] = None
    for name in exporters:
        try:
            with torch.no_grad():
                EXPORTERS[name](wrapped, args, names, path)
            return f"{name} exporter"
        except Exception as e:  # noqa: BLE001 (the next exporter; the last error is raised)
            error = e
    raise error


def _numpy_feeds(inputs: Inputs, names: Sequence[str]) -> dict:
    return {n: inputs[n].numpy() for n in names}


def _config_sizes(config) -> tuple[int, int]:
    """(attention heads, hidden size) of a transformers config (DistilBERT's names too)."""
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads")
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim")
    return int(heads), int(hidden)


def onnxruntime_fp32(onnx_path: str, config, tmp: str, say: Callable[[str], None] = print,
                     name: str = "onnxruntime fp32") -> tuple[Runtime, Optional[str]]:
    """ONNX Runtime on the CPU in float32. Returns (runtime, the ONNX file it runs: the BERT
    optimizer's output, or `onnx_path` when the optimizer fails; None when skipped)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return Runtime(name, skip=f"onnxruntime not installed ({e})"), None
    path, kind = os.path.join(tmp, "optimized.onnx"), "bert fusions"
    try:
        from onnxruntime.transformers.optimizer import optimize_model
        heads, hidden = _config_sizes(config)
        opt = optimize_model(onnx_path, model_type="bert", num_heads=heads, hidden_size=hidden)
        opt.save_model_to_file(path)
        fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        say(f"onnxruntime fusions: {fused}")
        note = f"fused: {', '.join(f'{k} {v}' for k, v in fused.items()) or 'none'}"
    except Exception as e:  # noqa: BLE001 (any optimizer failure: the exported graph instead)
        say(f"onnxruntime transformers optimizer failed ({type(e).__name__}: {e}); plain ORT")
        path, kind, note = onnx_path, "graph opt all", "BERT optimizer failed: plain ORT"
    return Runtime(f"{name} ({kind})", *_ort_session(ort, path), note=note), path


def _ort_session(ort, path: str) -> tuple:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return (lambda inputs: torch.from_numpy(sess.run(None, _numpy_feeds(inputs, names))[0]),)


def onnxruntime_int8(fp32_path: Optional[str], tmp: str,
                     name: str = "onnxruntime int8 (quantize_dynamic)") -> Runtime:
    """ONNX Runtime on ``quantize_dynamic(fp32_path)`` with its default settings. Give it the
    exported graph: the BERT optimizer's fused operators (com.microsoft domain) defeat its shape
    inference ("Unable to find data type for weight_name")."""
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import quantize_dynamic
    except ImportError as e:
        return Runtime(name, skip=f"onnxruntime not installed ({e})")
    if fp32_path is None:
        return Runtime(name, skip="no ONNX Runtime fp32 model to quantize")
    path = os.path.join(tmp, "int8_dynamic.onnx")
    quantize_dynamic(fp32_path, path)
    return Runtime(name, *_ort_session(ort, path),
                   note="quantize_dynamic defaults: int8 weights, activations at run time")


def _openvino_runtime(name: str, compiled, note_prefix: str = "") -> Runtime:
    out = compiled.output(0)
    names = [p.get_any_name() for p in compiled.inputs]
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    return Runtime(name, lambda inputs: torch.from_numpy(
        compiled(_numpy_feeds(inputs, names))[out].copy()),
        note=f"{note_prefix}ran at INFERENCE_PRECISION_HINT {precision}")


def openvino(onnx_path: str, precision: Optional[str] = None,
             name: Optional[str] = None) -> Runtime:
    """OpenVINO on the CPU: its default precision (`precision` None), or the given
    INFERENCE_PRECISION_HINT (e.g. "f32")."""
    name = name or ("openvino (default precision)" if precision is None
                    else f"openvino {precision}")
    try:
        import openvino as ov
    except ImportError as e:
        return Runtime(name, skip=f"openvino not installed ({e})")
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads()}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(ov.convert_model(onnx_path), "CPU", config)
    return _openvino_runtime(name, compiled)


def openvino_int8(onnx_path: str, calibration: Sequence[Inputs],
                  name: str = "openvino int8 (nncf)") -> Runtime:
    """OpenVINO on ``nncf.quantize`` of the model (int8 weights and activations, the activation
    ranges calibrated on `calibration`, ``model_type=TRANSFORMER`` as NNCF's documentation says
    for transformer encoders), compiled at the default precision. Skipped without nncf."""
    try:
        import openvino as ov
    except ImportError as e:
        return Runtime(name, skip=f"openvino not installed ({e})")
    try:
        import nncf
    except ImportError as e:
        return Runtime(name, skip=f"nncf not installed ({e}; pip install nncf)")
    if not calibration:
        return Runtime(name, skip="no calibration inputs")
    model = ov.convert_model(onnx_path)
    names = [p.get_any_name() for p in model.inputs]
    dataset = nncf.Dataset(list(calibration), lambda inputs: _numpy_feeds(inputs, names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(calibration))
    compiled = ov.Core().compile_model(quantized, "CPU",
                                       {"INFERENCE_NUM_THREADS": torch.get_num_threads()})
    return _openvino_runtime(name, compiled,
                             note_prefix=f"calibrated on {len(calibration)} inputs; ")


# the contenders' names (ORT fp32's gains "(bert fusions)" or "(graph opt all)" once built)
NAMES = ("onnxruntime fp32", "onnxruntime int8 (quantize_dynamic)",
         "openvino (default precision)", "openvino f32", "openvino int8 (nncf)")


def _guarded(name: str, build: Callable[[], Runtime]) -> Runtime:
    try:
        return build()
    except Exception as e:  # noqa: BLE001 (a failing runtime is a skipped row, the run goes on)
        return Runtime(name, skip=f"build failed: {type(e).__name__}: {str(e)[:200]}")


def runtime_contenders(model: torch.nn.Module, example: Inputs, tmp: str,
                       calibration: Sequence[Inputs] = (),
                       say: Callable[[str], None] = lambda what: None,
                       exporters: Sequence[str] = ("dynamo",)) -> list[Runtime]:
    """Every runtime of this module on `model`'s weights, in :data:`NAMES`' order, skipped
    ones with their reason. example: inputs for the export (their names become the ONNX inputs);
    calibration: inputs for OpenVINO's int8 (none: that row is skipped); tmp: a folder for the
    ONNX files; exporters: as :func:`export_onnx` (the dynamo exporter alone by default: the
    tracer's graph is wrong at other shapes once an attention_mask is an input)."""
    path = os.path.join(tmp, "encoder.onnx")
    names = NAMES
    try:
        say(f"ONNX export: {export_onnx(model, example, path, exporters)}")
    except Exception as e:  # noqa: BLE001
        reason = f"ONNX export failed: {type(e).__name__}: {str(e)[:200]}"
        return [Runtime(n, skip=reason) for n in names]
    out = []
    try:
        fp32, fp32_path = onnxruntime_fp32(path, model.config, tmp, say)
    except Exception as e:  # noqa: BLE001
        fp32, fp32_path = Runtime(names[0], skip=f"build failed: {type(e).__name__}: "
                                  f"{str(e)[:200]}"), None
    out.append(fp32)
    out.append(_guarded(names[1], lambda: onnxruntime_int8(
        None if fp32_path is None else path, tmp)))
    out.append(_guarded(names[2], lambda: openvino(path)))
    out.append(_guarded(names[3], lambda: openvino(path, "f32")))
    out.append(_guarded(names[4], lambda: openvino_int8(path, calibration)))
    return out
