"""The transformers export of a grape-pe model.

Shipped with every remote-code export (scripts/export_hf.py copies them, with model.py and chunked_attention.py):
    configuration_grape.py   GrapeConfig: the GPTConfig as config.json's "grape" dict
    modeling_grape.py        GrapeForCausalLM: model.GPT behind transformers' forward, cache and generate()
Not shipped:
    model_card.py            the export's README.md
"""
