"""Hugging Face conversion (tools/convert_to_hf.py, tools/convert_from_hf.py).

| file | job |
|---|---|
| `configuration_moepp.py`, `modeling_moepp.py` | remote code shipped in MoE++ exports (imports nothing of ours) |
| `layouts.py` | which layout (MoE++ release, our own fields, Mixtral) expresses a model exactly; config.json |
| `weights.py` | the one table between our parameter names/slices and the Hugging Face keys (both directions) |
| `import_config.py` | config.json -> our model/moe sections, or a one-line refusal |
| `safetensors_io.py` | sharded safetensors + index, written shard by shard, read lazily |
| `tokenizer.py` | the run's tokenizer: `tokenizer.model` (LlamaTokenizer) or `tokenizer.json` (fast) + config |
| `checkpoint_io.py` | our checkpoints: load any layout into one CPU process; write an imported model as step 0 |
| `export.py`, `importer.py` | the two conversions |

Nothing here is imported by training; transformers and safetensors are needed only by these tools.
"""
