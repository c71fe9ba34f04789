"""Small Hugging Face tokenizer directories with chat templates, built offline by the tests:
a byte-level BPE trained by ``tokenizers`` on a few sentences, with the special tokens of
ChatML and Llama 2, and a ``tokenizer_config.json`` holding the template."""
import json
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]

# ChatML: a system turn (with the tools, when there are any, as JSON lines), then
# <|im_start|>role\ncontent<|im_end|>\n per turn
CHATML = (
    "{%- set ns = namespace(system='') -%}"
    "{%- if messages[0].role == 'system' %}{% set ns.system = messages[0].content %}{% endif -%}"
    "{%- if tools %}{% set ns.system = ns.system + '\\n\\nYou may call these tools:' -%}"
    "{%- for tool in tools %}{% set ns.system = ns.system + '\\n' + (tool | tojson) %}"
    "{% endfor %}{% endif -%}"
    "{%- if ns.system %}{{ '<|im_start|>system\\n' + ns.system.strip() + '<|im_end|>\\n' }}"
    "{% endif -%}"
    "{%- for m in messages if m.role != 'system' -%}"
    "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}")

# Llama 2: <s>[INST] (<<SYS>> block) user [/INST] answer </s> per exchange; no generation
# prompt of its own (the prompt ends with [/INST])
LLAMA2 = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}"
    "{% set ns.system = '<<SYS>>\\n' + m.content + '\\n<</SYS>>\\n\\n' %}"
    "{%- elif m.role == 'user' -%}"
    "{{ bos_token + '[INST] ' + (ns.system + m.content).strip() + ' [/INST]' }}"
    "{%- set ns.system = '' -%}"
    "{%- elif m.role == 'assistant' %}{{ ' ' + m.content.strip() + ' ' + eos_token }}"
    "{%- else %}{{ raise_exception('unknown role ' + m.role) }}{% endif -%}"
    "{%- endfor -%}")

# ChatML, but the assistant header of a written turn differs from the generation prompt:
# prefixes of the rendering are not prefixes of the whole
BROKEN = CHATML.replace("'<|im_start|>' + m.role + '\\n' + m.content",
                        "'<|im_start|>' + m.role + ': ' + m.content")

CORPUS = [
    "Hello there! How are you today? I am fine, thank you.",
    "The user asks a question and the assistant answers it.",
    "What is the capital of France? Paris is the capital of France.",
    "Tell me a story about a little dog named Max who loved to run.",
    "system prompt: you are a helpful assistant. Tools: weather, time.",
    "{\"type\": \"function\", \"name\": \"get_weather\", \"parameters\": {}}",
    "Numbers 0 1 2 3 4 5 6 7 8 9, and more words: cat, sun, tree, blue.",
]


def tokenizer_dir(path: Path, template=CHATML, vocab_size=400, **config) -> Path:
    """Write tokenizer.json and tokenizer_config.json (with ``template``, None for none)
    into ``path``. ChatML templates get EOS <|endoftext|> and no BOS; Llama 2 ones <s> and
    </s>; ``config`` overrides."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(str(path / "tokenizer.json"))
    llama = template is LLAMA2
    cfg = {"bos_token": "<s>" if llama else None,
           "eos_token": "</s>" if llama else "<|endoftext|>",
           "model_max_length": 4096}
    if template is not None:
        cfg["chat_template"] = template
    cfg.update(config)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return path


def conversation(system=True, turns=2):
    """A multi-turn conversation (system prompt, user and assistant turns)."""
    messages = [{"role": "system", "content": "You are a helpful assistant."}] if system else []
    answers = ["Paris is the capital of France.", "Max the little dog loved to run!",
               "I am fine, thank you."]
    questions = ["What is the capital of France?", "Tell me a story about a dog.",
                 "How are you today?"]
    for q, a in list(zip(questions, answers))[:turns]:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                           "parameters": {"type": "object", "properties": {}}}}]
