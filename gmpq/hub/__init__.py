"""Layer 6 — models on disk: gmpq's one model-directory format (float, fake-quant and packed models), its writer
and its one loader, bit packing, model cards, the Hugging Face Hub and the local hub index. Needs quant, policy and
models only.

    import gmpq
    gmpq.hub.write_model_dir(model, "runs/x/pretrain/model")          # a float or fake-quant model, as trained
    report = gmpq.save_pretrained(model, "hub/my-model", dataset="cifar10", top1=88.1)   # packed + model card
    model = gmpq.from_pretrained("hub/my-model")            # any gmpq model directory, or a Hub repo id: "user/my-model"
    gmpq.push_to_hub("hub/my-model", "user/my-model")
    gmpq.export_onnx(model, "onnx/my-model")                 # ONNX QDQ graph + card (pip install "gmpq[onnx]")
"""

from gmpq.hub.export import ExportReport, push_to_hub, save_pretrained, write_model_dir
from gmpq.hub.format import is_model_dir
from gmpq.hub.index import HubEntry, list_hub, update_index
from gmpq.hub.load import check_finite, from_pretrained, load_model_dir, read_state_dict, resolve_model_dir
from gmpq.hub.onnx_export import OnnxExport, export_onnx
from gmpq.hub.packing import pack_codes, packed_nbytes, unpack_codes

__all__ = [
    "ExportReport", "HubEntry", "OnnxExport", "export_onnx", "from_pretrained", "is_model_dir", "list_hub",
    "check_finite", "load_model_dir", "pack_codes", "packed_nbytes", "push_to_hub", "read_state_dict", "resolve_model_dir",
    "save_pretrained", "unpack_codes", "update_index", "write_model_dir",
]
