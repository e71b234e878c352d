"""Layer 6 — publishing: export quantized models as packed low-bit safetensors + policy + config + model card, load
them back from a directory or the Hugging Face Hub, and keep the local hub index.

    import gmpq
    report = gmpq.save_pretrained(model, "hub/my-model", dataset="cifar10", top1=88.1)
    model = gmpq.from_pretrained("hub/my-model")            # or a Hub repo id: "user/my-model"
    gmpq.push_to_hub("hub/my-model", "user/my-model")
    gmpq.export_onnx(model, "onnx/my-model")                 # ONNX QDQ graph + card (pip install "gmpq[onnx]")
"""

from gmpq.hub.export import ExportReport, push_to_hub, save_pretrained
from gmpq.hub.index import HubEntry, list_hub, update_index
from gmpq.hub.load import from_pretrained, load_export_dir
from gmpq.hub.onnx_export import OnnxExport, export_onnx
from gmpq.hub.packing import pack_codes, packed_nbytes, unpack_codes

__all__ = [
    "ExportReport", "HubEntry", "OnnxExport", "export_onnx", "from_pretrained", "list_hub", "load_export_dir", "pack_codes", "packed_nbytes",
    "push_to_hub", "save_pretrained", "unpack_codes", "update_index",
]
