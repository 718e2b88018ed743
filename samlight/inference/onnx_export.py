"""ONNX export: the prompt encoder + mask decoder with the official `segment_anything` ONNX interface, and the
image encoder on its own.

The decoder graph takes exactly the inputs of the official export (`segment_anything.utils.onnx.SamOnnxModel`,
scripts/export_onnx_model.py), so tools built on it (the official web demo, CVAT, X-AnyLabeling style runners)
can run a samlight model unchanged:

    image_embeddings  1 x C x h x w    from the image encoder (h = w = S/16)
    point_coords      1 x N x 2        (x, y) in the resized input frame (`samlight.modeling.transforms.apply_coords`)
    point_labels      1 x N            1 fg, 0 bg, 2 / 3 box top-left / bottom-right corner, -1 padding point
    mask_input        1 x 1 x 4h x 4w  low-res logits of a previous prediction
    has_mask_input    1                1 to use mask_input, 0 to ignore it
    orig_im_size      2                (H, W) of the original image, float

and returns `masks` (1 x K x H x W logits at the original size), `iou_predictions` (1 x K) and `low_res_masks`
(1 x K x 4h x 4w). K = 4 (the single-mask output 0, then the three multimask outputs) or, with
`return_single_mask`, 1 (picked as the official export does: output 0 for more than two points, else the best
multimask output). As in the official graph no padding point is added: append a (0, 0) point with label -1
when there is no box. N is a dynamic axis.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samlight.modeling.sam import Sam

DECODER_INPUTS = (
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
)
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
OPSET = 17


class SamOnnxDecoder(nn.Module):
    """Prompt encoder + mask decoder + mask post-processing of a samlight `Sam`, written to trace to ONNX.

    Uses the model's own submodules (so the weights are shared, not copied); only the parts that need
    data-independent control flow (label handling, the optional mask input, the crop to the image) are spelled
    out here with arithmetic instead of branches.
    """

    def __init__(self, model: Sam, *, return_single_mask: bool = False) -> None:
        super().__init__()
        self.model = model
        self.return_single_mask = return_single_mask

    def _embed_points(self, coords: Tensor, labels: Tensor) -> Tensor:
        """coords 1 x N x 2 input pixels, labels 1 x N float -> 1 x N x C sparse tokens."""
        pe = self.model.prompt_encoder
        embedding = pe.pe_layer.forward_with_coords(coords + 0.5, pe.input_image_size)  # 1 x N x C
        labels = labels[..., None]  # 1 x N x 1
        for i, point_embedding in enumerate(pe.point_embeddings):  # 0 bg, 1 fg, 2 / 3 box corners
            embedding = torch.where(labels == i, embedding + point_embedding.weight, embedding)
        return torch.where(labels == -1, pe.not_a_point_embed.weight, embedding)

    def _embed_mask(self, mask_input: Tensor, has_mask_input: Tensor) -> Tensor:
        """mask_input 1 x 1 x 4h x 4w, has_mask_input 1 -> dense 1 x C x h x w (or 1 x C x 1 x 1 broadcast)."""
        pe = self.model.prompt_encoder
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask_input * pe.mask_downscaling(mask_input) + (1 - has_mask_input) * no_mask

    def _upscale(self, masks: Tensor, orig_im_size: Tensor) -> Tensor:
        """1 x K x 4h x 4w logits -> 1 x K x H x W: to S x S, crop the padding, resize to the original size."""
        s = self.model.image_size
        masks = F.interpolate(masks, size=(s, s), mode="bilinear", align_corners=False)
        # Same rounding as transforms.get_preprocess_shape (half up), computed in the graph from orig_im_size.
        resized = torch.floor(orig_im_size * (s / orig_im_size.max()) + 0.5).to(torch.int64)
        masks = masks[..., : resized[0], : resized[1]]
        size = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)

    def _select_single(self, masks: Tensor, scores: Tensor, num_points: int) -> tuple[Tensor, Tensor]:
        """The official rule without branches: output 0 for > 2 points, else the best multimask output."""
        bias = torch.zeros_like(scores[:1])  # 1 x K
        bias[:, 0] = 1000.0
        best = torch.argmax(scores + (num_points - 2.5) * bias, dim=1)  # 1
        rows = torch.arange(masks.shape[0])
        return masks[rows, best][:, None], scores[rows, best][:, None]

    def forward(
        self,
        image_embeddings: Tensor,
        point_coords: Tensor,
        point_labels: Tensor,
        mask_input: Tensor,
        has_mask_input: Tensor,
        orig_im_size: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """See the module docstring for shapes; returns (masks, iou_predictions, low_res_masks)."""
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_mask(mask_input, has_mask_input)
        low_res, scores = self.model.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )  # 1 x 4 x 4h x 4w, 1 x 4
        if self.return_single_mask:
            low_res, scores = self._select_single(low_res, scores, point_coords.shape[1])
        return self._upscale(low_res, orig_im_size), scores, low_res


class SamOnnxEncoder(nn.Module):
    """The image encoder: B x 3 x S x S normalised, zero-padded images -> B x C x S/16 x S/16 embeddings.

    Preprocess as `SamPredictor.set_image` does: resize the long side to S (`resize_longest_image`), subtract
    `PIXEL_MEAN`, divide by `PIXEL_STD` (0-255 scale), zero-pad bottom-right to S x S, channels first.
    """

    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        return self.model.image_encoder(image)


def decoder_example_inputs(model: Sam, num_points: int = 5) -> tuple[Tensor, ...]:
    """Dummy inputs of the official export's shapes (values only steer tracing, never the weights)."""
    pe = model.prompt_encoder
    h, w = pe.image_embedding_size
    s = model.image_size
    return (
        torch.randn(1, pe.embed_dim, h, w),
        torch.randint(0, s, (1, num_points, 2)).float(),
        torch.randint(0, 4, (1, num_points)).float(),
        torch.randn(1, 1, *pe.mask_input_size),
        torch.tensor([1.0]),
        torch.tensor([s * 1.5, s * 2.0]),
    )


def export_decoder(
    model: Sam,
    path: str | os.PathLike,
    *,
    return_single_mask: bool = False,
    quantize: bool = False,
    opset: int = OPSET,
) -> Path:
    """Write the prompt encoder + mask decoder of `model` as ONNX (official interface; see module docstring).

    `quantize`: dynamic uint8 weight quantisation with onnxruntime (as the official export script offers).
    The file is written atomically. Returns the path.
    """
    model = _cpu_float(model)
    wrapper = SamOnnxDecoder(model, return_single_mask=return_single_mask)
    dynamic = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
    example = decoder_example_inputs(model)
    return _export(wrapper, example, path, DECODER_INPUTS, DECODER_OUTPUTS, dynamic, opset, quantize)


def export_encoder(
    model: Sam, path: str | os.PathLike, *, quantize: bool = False, opset: int = OPSET
) -> Path:
    """Write the image encoder as ONNX: input `image` (B x 3 x S x S, dynamic B), output `image_embeddings`."""
    s = model.image_size
    dynamic = {"image": {0: "batch"}, "image_embeddings": {0: "batch"}}
    example = (torch.randn(1, 3, s, s),)
    wrapper = SamOnnxEncoder(_static_pos_embed(_cpu_float(model)))
    return _export(wrapper, example, path, ("image",), ("image_embeddings",), dynamic, opset, quantize)


def _static_pos_embed(model: Sam) -> Sam:
    """At an input size other than the encoder's, a copy whose position embedding is already resampled.

    timm resamples it at run time with antialiased bicubic interpolation, which ONNX has no operator for; the
    same resampling done once here (timm's own function) gives the graph a plain parameter of the right size.
    """
    from timm.layers import resample_abs_pos_embed_nhwc

    pos = model.image_encoder.pos_embed
    grid = list(model.prompt_encoder.image_embedding_size)
    if pos is None or list(pos.shape[1:3]) == grid:
        return model
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.image_encoder.pos_embed = nn.Parameter(resample_abs_pos_embed_nhwc(pos, grid))
    return model


def _cpu_float(model: Sam) -> Sam:
    """`model` itself when it is float32 on the CPU (the exported graph's dtype and device), else a copy."""
    if not isinstance(model, Sam):
        raise TypeError(f"ONNX export needs a samlight Sam, got {type(model).__name__}")
    if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters()):
        return model
    return copy.deepcopy(model).to("cpu", torch.float32)


def _export(
    module: nn.Module,
    example: tuple[Tensor, ...],
    path: str | os.PathLike,
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
    quantize: bool,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    tmp_float = path.with_name(f".{path.stem}.float{os.getpid()}{path.suffix}")
    was_training = module.training
    module.eval()  # drop path and dropout off in the graph; the caller's mode is restored below
    try:
        # Tracing warns at every Python-level shape check; the graph's dynamic axes are tested instead.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # The TorchScript exporter (dynamo=False): it supports dynamic_axes, which the official interface
            # uses for the number of points, and needs no onnxscript.
            torch.onnx.export(
                module,
                example,
                str(tmp_float if quantize else tmp),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        if quantize:
            quantize_dynamic_uint8(tmp_float, tmp)
        os.replace(tmp, path)
    finally:
        module.train(was_training)
        tmp.unlink(missing_ok=True)
        tmp_float.unlink(missing_ok=True)
    return path


def quantize_dynamic_uint8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """onnxruntime's dynamic quantisation: uint8 weights, activations quantised at run time (MatMul, Gemm...)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise ImportError("--quantize needs onnxruntime: pip install 'samlight[onnx]'") from e
    quantize_dynamic(
        model_input=str(src),
        model_output=str(dst),
        per_channel=False,
        reduce_range=False,
        weight_type=QuantType.QUInt8,
    )
    return Path(dst)
