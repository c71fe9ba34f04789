"""anecy chat: a conversation with a model in its chat template, typed or piped."""

import sys
import time

from ..errors import AnecyError
from ._args import non_negative_int, positive_int
from .sample import (
    add_decoder_arguments,
    add_sampling_arguments,
    add_source_arguments,
    load_model,
    source_and_adapters,
)

HELP = "chat with a model in its chat template (interactive, or one message a line from a pipe)"
# the cache's positions when --context is not given: the model's context, at most this many
# (Qwen3-0.6B's 40960 positions would take 9 GB of keys and values)
DEFAULT_CONTEXT = 4096
COMMANDS_HELP = ("/reset forgets the conversation, /system TEXT sets the system prompt (/system "
                 "alone removes it), Ctrl-C stops a reply, Ctrl-D leaves")


def add_arguments(p):
    add_source_arguments(p)
    p.add_argument("--tokenizer", metavar="PATH",
                   help="a Hugging Face tokenizer directory with a chat template (default: the "
                        "HF directory itself, or the one the checkpoint's data was prepared "
                        "with)")
    p.add_argument("--chat-template", metavar="FILE",
                   help="a Jinja chat template to use instead of the tokenizer's")
    p.add_argument("--system", metavar="TEXT", help="a system prompt to start with")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=512, metavar="N",
                   help="tokens per reply at most (default 512; fewer at the end-of-turn token "
                        "or at the end of the context)")
    p.add_argument("--context", type=positive_int, metavar="N",
                   help="positions the conversation may take (default: the model's context, "
                        f"at most {DEFAULT_CONTEXT})")
    p.add_argument("--stats", action="store_true",
                   help="after each reply, print to stderr the tokens prefilled and generated "
                        "and the rate")
    add_sampling_arguments(p)
    add_decoder_arguments(p)


class Chat:
    """A conversation: the messages so far, rendered by ``template`` and decoded by a
    ``Session``, whose cache keeps what earlier turns computed."""

    def __init__(self, template, session, max_new_tokens, system=None, write=None, log=None):
        self.template, self.session, self.max_new_tokens = template, session, max_new_tokens
        self.system = system
        self.messages = []
        self.write = write or _write_stdout
        self.log = log or (lambda text: print(text, file=sys.stderr))
        # what the last turn did: tokens prefilled and generated, seconds to the first new
        # token (prefill_s) and from it to the last (decode_s)
        self.last = {}

    def conversation(self, messages=None):
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + (self.messages if messages is None else messages)

    def command(self, line) -> bool:
        """Carry out a /command line; False when the line is a message."""
        word, _, rest = line.partition(" ")
        if word == "/reset" and not rest.strip():
            self.messages = []
            self.session.reset()
        elif word == "/system":
            self.system = rest.strip() or None
        elif word == "/help" and not rest.strip():
            self.log(COMMANDS_HELP)
        else:
            return False
        return True

    def turn(self, text) -> str:
        """Send ``text`` as the user's message; stream the reply and return it. Ctrl-C stops
        the reply: what was shown stays in the conversation as the answer (a turn stopped
        before any text was shown is dropped)."""
        from ..generate import stream_text
        messages = self.messages + [{"role": "user", "content": text}]
        ids = self.template.render(self.conversation(messages), add_generation_prompt=True)
        if len(ids) >= self.session.max_len:
            raise AnecyError(f"the conversation takes {len(ids)} tokens, the context "
                             f"{self.session.max_len}: /reset to start over, or raise --context")
        before = self.session.prefilled
        generated, times = [], []

        def collect(tokens):
            for t in tokens:
                generated.append(t)
                times.append(time.perf_counter())
                yield t

        start = time.perf_counter()
        tokens = pieces = None
        shown = []
        stopped = False
        try:
            self.session.feed(ids)
            tokens = self.session.reply(self.max_new_tokens, self.template.stop_ids)
            pieces = stream_text(self.template.decode, [], collect(tokens))
            for piece in pieces:
                self.write(piece)
                shown.append(piece)
        except KeyboardInterrupt:
            stopped = True
            if not "".join(shown):
                self.write("\n")
                return ""
        finally:
            for g in (pieces, tokens):
                if g is not None:
                    g.close()
            self.last = {"prefilled": self.session.prefilled - before,
                         "generated": len(generated),
                         "prefill_s": (times[0] if times else time.perf_counter()) - start,
                         "decode_s": times[-1] - times[0] if times else 0.0}
        self.write("\n")
        reply = "".join(shown) if stopped else self.template.decode(generated)
        self.messages = messages + [{"role": "assistant", "content": reply}]
        if self.session.decoder.pos == self.session.max_len:
            self.log(f"(the context of {self.session.max_len} tokens is full: /reset to start "
                     "over, or raise --context)")
        return reply


def _write_stdout(text):
    sys.stdout.write(text)
    sys.stdout.flush()


def load_chat(args):
    """(Chat, description) for the parsed arguments."""
    from ..chat_data import ChatTemplate
    from ..generate import SamplingConfig, Session
    from ..pretrained import tokenizer_for
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed)
    source, adapters = source_and_adapters(args)
    tok = tokenizer_for(source, args.tokenizer)
    if tok is None or tok.kind != "hf":
        raise AnecyError(f"no Hugging Face tokenizer with a chat template known for "
                         f"{source.describe}: name its directory with --tokenizer")
    template = ChatTemplate(tok.path, args.chat_template)
    model = load_model(source, adapters)
    if template.vocab_size > model.config.vocab_size:
        raise AnecyError(f"tokenizer {template.path} has {template.vocab_size} tokens, more "
                         f"than the model's vocabulary of {model.config.vocab_size}: is it this "
                         "model's tokenizer?")
    context = args.context or min(source.config.seq_len, DEFAULT_CONTEXT)
    session = Session(model, max_len=context, sampling=sampling, threads=args.threads,
                      dtype=args.dtype)
    return Chat(template, session, args.max_new_tokens, system=args.system), source.describe


def run(args) -> int:
    chat, what = load_chat(args)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        print(f"{what}, context {chat.session.max_len} tokens. {COMMANDS_HELP}.",
              file=sys.stderr)
    lines = None if interactive else iter(sys.stdin)
    while True:
        try:
            line = input("> ") if interactive else next(lines, None)
        except KeyboardInterrupt:   # at the prompt: a fresh line, as in a shell
            print(file=sys.stderr)
            continue
        except EOFError:
            line = None
        if line is None:
            if interactive:
                print(file=sys.stderr)
            return 0
        line = line.rstrip("\r\n")
        if not line.strip() or chat.command(line.strip()):
            continue
        try:
            chat.turn(line)
        except AnecyError as e:
            if not interactive:
                raise
            print(f"anecy chat: error: {e}", file=sys.stderr)
            continue
        if args.stats:
            s = chat.last
            # as anecy sample: the rate's clock starts at the first new token
            rate = max(s["generated"] - 1, 0) / max(s["decode_s"], 1e-9)
            print(f"prefilled {s['prefilled']} tokens in {s['prefill_s']:.2f} s, generated "
                  f"{s['generated']} at {rate:.1f} tokens/s", file=sys.stderr)
