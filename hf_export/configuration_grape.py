"""
The transformers configuration of a grape-pe model (remote code; scripts/export_hf.py ships this file, model.py and
chunked_attention.py next to config.json).

config.json holds the model's GPTConfig (model.py) as one dict under "grape", so the architecture has one description,
the one model.py builds from; the names transformers and lm-eval look for are read from it:

    grape                    {GPTConfig field: value}; missing fields take GPTConfig's defaults
    vocab_size               grape["vocab_size"]  (GPT-2's 50,257 tokens padded to 50,304)
    hidden_size              grape["n_embd"]
    num_hidden_layers        grape["n_layer"]
    num_attention_heads      grape["n_head"]      (every head has its own keys and values)
    head_dim                 grape["head_dim"]
    max_position_embeddings  grape["block_size"]  (the training length; lm-eval's default max_length. PEs that
                                                   extrapolate accept longer inputs)
    tie_word_embeddings      true (the LM head is the embedding matrix)

The GPTConfig is nested rather than spread over config.json because transformers gives some of its field names its
own meaning (rope_scaling is a property of every transformers config). To change a field at load time (a longer
block_size, an evaluation-time RoPE scaling), edit the dict:

    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    config.grape.update(block_size=8192)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, trust_remote_code=True)

A "grape" dict that GPTConfig rejects (an unknown field, a value out of range, a pos_encoding this model.py does not
have) is a ValueError when the config is built, naming the field.
"""

from transformers import PreTrainedConfig

try:
    from .model import GPTConfig
except ImportError:  # in the grape-pe repository model.py is a top-level module, beside this package
    from model import GPTConfig


def _gpt_field(name):
    """A read-only property giving the GPTConfig's field `name`."""
    return property(lambda self: getattr(self.gpt_config(), name))

class GrapeConfig(PreTrainedConfig):
    model_type = "grape_pe"

    grape: dict | None = None
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        self.grape = dict(self.grape or {})
        self.gpt_config()  # refuse a dict model.py cannot build, when the config is made rather than at first use
        super().__post_init__(**kwargs)

    def gpt_config(self):
        """The GPTConfig of `grape` (a fresh object: changing it does not change this config)."""
        try:
            return GPTConfig(**self.grape)
        except TypeError as e:  # an unknown field name
            raise ValueError(f"{type(self).__name__}.grape: {e}; the fields model.py knows: "
                             f"{', '.join(GPTConfig.__dataclass_fields__)}") from None
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}.grape: {e}") from None

    # transformers' names for the sizes (read by generation, lm-eval and accelerate), from the GPTConfig
    vocab_size = _gpt_field("vocab_size")
    hidden_size = _gpt_field("n_embd")
    num_hidden_layers = _gpt_field("n_layer")
    num_attention_heads = _gpt_field("n_head")
    head_dim = _gpt_field("head_dim")
    max_position_embeddings = _gpt_field("block_size")
