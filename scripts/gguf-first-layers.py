#!/usr/bin/env python3
"""Writes a GGUF that is the first N transformer blocks of another: the same metadata (with the
block count set to N), the same tokenizer, embeddings, output norm and head, and blocks 0..N-1
as stored (quantised bytes copied as they are). A smaller model of the same shapes, for carrying
to a machine whose working tree is limited (scripts/gpu-check.sh).

    scripts/gguf-first-layers.py IN.gguf OUT.gguf N

Needs the `gguf` package (llama.cpp's gguf-py): `python3 -m pip install gguf`.
"""

from __future__ import annotations

import re
import sys

import gguf


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst, keep = sys.argv[1], sys.argv[2], int(sys.argv[3])
    reader = gguf.GGUFReader(src)
    arch = reader.get_field("general.architecture").contents()
    count_key = f"{arch}.block_count"
    blocks = int(reader.get_field(count_key).contents())
    if not 0 < keep <= blocks:
        print(f"{src} has {blocks} blocks; cannot keep {keep}", file=sys.stderr)
        return 2
    writer = gguf.GGUFWriter(dst, arch, endianess=reader.endianess)
    for field in reader.fields.values():
        # The writer writes these itself.
        if field.name in ("general.architecture", "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"):
            continue
        if field.name.startswith("GGUF."):
            continue
        value = keep if field.name == count_key else field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    kept = 0
    for tensor in reader.tensors:
        m = re.match(r"blk\.(\d+)\.", tensor.name)
        if m and int(m.group(1)) >= keep:
            continue
        # As read: quantised data as its bytes (the writer recovers the shape from them and the
        # ggml type), floats as arrays.
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
        kept += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"{dst}: {keep} of {blocks} blocks, {kept} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
