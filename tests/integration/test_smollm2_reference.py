"""SmolLM2-135M on our engine against Hugging Face transformers on the same GGUF weights."""

import pytest
import torch

from instance.engine import Engine
from instance.model.loader import smollm2_path
from instance.sampling import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
]
NEW_TOKENS = 32
# Where our argmax differs from transformers', the two top logits must be this close (a tie broken by float
# rounding). Past such a position the sequences diverge legitimately, so the comparison stops there.
TIE_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(model="smollm2-135m", num_blocks=512, max_model_len=2048)


@pytest.fixture(scope="module")
def reference():
    import transformers  # the reference; a test dependency that `make test` installs
    path = smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    model.generation_config.eos_token_id = None   # always produce NEW_TOKENS, as ignore_eos does on our side
    return model.eval()


def test_greedy_tokens_match_transformers(engine, reference):
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    exact = 0
    for prompt, out in zip(PROMPTS, outs):
        ids = engine.tokenizer.encode(prompt)
        with torch.inference_mode():
            hf = reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                    pad_token_id=0)[0, len(ids):].tolist()
        ours = out.new_token_ids
        assert len(ours) == NEW_TOKENS
        if ours == hf:
            exact += 1
            continue
        i = next(k for k in range(NEW_TOKENS) if ours[k] != hf[k])
        with torch.inference_mode():
            logits = reference(torch.tensor([ids + hf[:i]])).logits[0, -1]
        gap = (logits[hf[i]] - logits[ours[i]]).abs().item()
        assert gap <= TIE_TOLERANCE, f"prompt {prompt!r}: token {i} differs ({ours[i]} vs {hf[i]}), logit gap {gap}"
    assert exact >= 3, "at least three prompts must match token for token"


def test_text_is_what_the_tokens_decode_to(engine):
    out = engine.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert out.text_delta == engine.tokenizer.decode(out.new_token_ids)
    assert "Paris" in out.text_delta
