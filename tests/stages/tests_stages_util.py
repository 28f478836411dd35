"""Read one full tensor from a torch_dist checkpoint (DCP reassembles TP/PP shards)."""
import torch
import torch.distributed.checkpoint as dcp


def read_tensor(ckpt, key):
    reader = dcp.FileSystemReader(str(ckpt))
    meta = reader.read_metadata().state_dict_metadata[key]
    out = {key: torch.empty(meta.size, dtype=meta.properties.dtype)}
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out[key]
