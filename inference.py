"""Generate text from a model.

    python inference.py NAME "prompt 1" "prompt 2" --temp=0.7 --min_p=0.05 --top_k=None --max_len=100
    python inference.py NAME                      # prompt loop: type prompts, /temp 0.5, /help, /quit

NAME is a trained/ model name or checkpoint folder, or a Hugging Face id or directory of GPT-2, Llama, Mistral,
Qwen2 or Qwen3.
One prompt streams its text as it is produced; several are generated together as one batch; none (or
--interactive) opens a prompt loop that keeps the model loaded. Samplers run in the order repetition
penalty, temperature, top-k, top-p, min-p (see toolkit/sampling.py); None switches one off.
Generation stops at the tokenizer's EOS or after max_len new tokens. Past the model's context, the
window restarts on its last half (see toolkit/generate.py), so max_len has no upper limit.
"""
import dataclasses
import sys
import time

import torch

import tools
from config import ConfigError, closest
from toolkit.cli import Parser, parse_value, protect_output
from toolkit.generate import GenerationError, GenerationSettings, TextStream, generate
from toolkit.tokenizer import TokenizerError

SETTINGS = {field.name: field for field in dataclasses.fields(GenerationSettings)}

SETTING_HELP = {
    "temp": "temperature; 0 = greedy",
    "top_k": "keep the k most likely tokens",
    "top_p": "keep the smallest set of most likely tokens with probability >= p",
    "min_p": "keep tokens at least min_p times as likely as the most likely one",
    "repetition_penalty": "> 1 discourages tokens already in the text; 1 = off",
    "max_len": "new tokens per prompt, at most (past the context the window slides)",
    "seed": "random seed for reproducible sampling",
}
COMMANDS = ("type a prompt to generate from it, or a command:\n"
            "  /temp 0.5, /top_k 40, /top_p None, /min_p 0.1, /repetition_penalty 1.2, /max_len 50, /seed 0\n"
            "  /show_tokens and /no_cache switch those on or off; /settings shows them all; /help; /quit (or EOF)")


def updated(settings: GenerationSettings, texts: dict[str, str]) -> GenerationSettings:
    """A copy with settings given as typed ("0.5", "None"), checked as at construction. The options
    and the prompt loop's commands both come here; a bad name or value raises a one-line ConfigError."""
    for name in texts:
        if name not in SETTINGS:
            raise ConfigError(f"unknown setting {name!r}{closest(name, SETTINGS)}; settings: {', '.join(SETTINGS)}")
    return dataclasses.replace(settings, **{name: parse_value(SETTINGS[name], text) for name, text in texts.items()})


def parse_args(argv):
    """(arguments, GenerationSettings); bad values end the program with one line naming the option."""
    parser = Parser("python inference.py", usage="python inference.py MODEL [PROMPT ...] [--option=value ...]",
                    description=__doc__)
    # Optional only for the parser, whose own message would also call the prompts required.
    parser.add_argument("model", nargs="?", help="trained/ name, checkpoint folder, or Hugging Face id or directory")
    parser.add_argument("prompts", nargs="*", help="prompts generated together; none opens the prompt loop")
    defaults = GenerationSettings()
    for name in SETTINGS:
        parser.add_argument(f"--{name}", metavar="VALUE",
                            help=f"{SETTING_HELP[name]} (default {getattr(defaults, name)})")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    parser.add_argument("--show_tokens", action="store_true", help="show token boundaries and ids of the text")
    parser.add_argument("--no_cache", action="store_true", help="recompute every token without the KV cache (slow)")
    parser.add_argument("--interactive", action="store_true", help="open the prompt loop (after any prompts)")
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error("name a model: a trained/ name, a checkpoint folder, or a Hugging Face id or directory")
    try:
        given = {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
        settings = updated(defaults, given)
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.exit(2, f"error: --device={args.device!r} is not a device: use cpu, cuda, cuda:N or mps\n")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(args.device.type, False):
        parser.exit(2, f"error: --device={args.device} is not available here: use --device=cpu\n")
    return args, settings


@dataclasses.dataclass
class Session:
    """A loaded model and the settings that the prompt loop can change."""
    model: torch.nn.Module
    tokenizer: object
    settings: GenerationSettings
    show_tokens: bool = False
    no_cache: bool = False

    def run(self, prompts: list[str]):
        """Generate from the prompts and print the texts: streamed for one prompt, after the batch for several."""
        prompt_ids = self.tokenizer.encode(prompts, bos=True)
        longest, context = max(map(len, prompt_ids)), self.model.cfg.context_length
        if longest > context:
            print(f"[a prompt of {longest} tokens is longer than the model's context_length={context}: "
                  f"the model sees its last {context}]", file=sys.stderr)
        start = time.perf_counter()
        if len(prompts) == 1:
            new_ids = self.stream(prompts[0], prompt_ids[0])
        else:
            new_ids = generate(self.model, prompt_ids, self.settings, eos_id=self.tokenizer.eos_id,
                               use_cache=not self.no_cache)
        seconds = time.perf_counter() - start
        texts = self.tokenizer.decode([p + n for p, n in zip(prompt_ids, new_ids)])
        for k, text in enumerate(texts):
            if len(prompts) > 1:
                print(f"=== {k + 1} ===\n{text}")
            if self.show_tokens:
                self.tokenizer.display(text)
        n_new = sum(map(len, new_ids))
        print(f"[{n_new} new tokens in {seconds:.2f} s, {n_new / seconds:.0f} tokens/s]", file=sys.stderr)

    def stream(self, prompt: str, prompt_ids: list[int]) -> list[list[int]]:
        text = TextStream(self.tokenizer, prompt_ids)

        def show(step):
            if step.index == 0:  # here, not before: a request that cannot run prints nothing but its error
                print(prompt, end="", flush=True)
            print(text.add(step.tokens.tolist()), end="", flush=True)

        new_ids = generate(self.model, [prompt_ids], self.settings, eos_id=self.tokenizer.eos_id,
                           use_cache=not self.no_cache, on_step=show)
        print(text.finish(), flush=True)
        return new_ids

    def loop(self):
        """Read prompts and commands from stdin until /quit or EOF."""
        print(COMMANDS)
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                print()
                return
            if line.startswith("/"):
                if not self.command(line[1:]):
                    return
            elif line:
                try:
                    self.run([line])
                except GenerationError as e:
                    print(f"error: {e}", file=sys.stderr)
                except KeyboardInterrupt:  # Ctrl-C stops this generation, not the loop
                    print("\n[stopped]")

    def command(self, text: str) -> bool:
        """Carry out one /command; False means quit."""
        name, _, value = text.strip().partition(" ")
        if name in ("quit", "exit"):
            return False
        if name == "help":
            print(COMMANDS)
        elif name == "settings":
            print(self.describe())
        elif name in ("show_tokens", "no_cache"):
            setattr(self, name, not getattr(self, name))
            print(f"{name}={getattr(self, name)}")
        else:
            try:
                self.settings = updated(self.settings, {name: value.strip()})
                print(f"{name}={getattr(self.settings, name)}")
            except ConfigError as e:  # said as the user typed it: /top_k, not --top_k
                print(f"error: {str(e).replace(f'--{name}=', f'/{name} ', 1)}", file=sys.stderr)
        return True

    def describe(self) -> str:
        values = {**dataclasses.asdict(self.settings), "show_tokens": self.show_tokens, "no_cache": self.no_cache}
        return " ".join(f"{name}={value}" for name, value in values.items())


def main(argv=None):
    protect_output()  # `| head` closing the pipe ends the output, never with a traceback
    args, settings = parse_args(argv)
    try:
        model, tokenizer = tools.load_model(args.model, args.device)
    except (tools.LoadError, TokenizerError) as e:
        sys.exit(f"error: {e}")
    if tokenizer is None:
        sys.exit(f"error: {tools.no_tokenizer_error(args.model)}")
    session = Session(model, tokenizer, settings, args.show_tokens, args.no_cache)
    try:
        if args.prompts:
            session.run(args.prompts)
        if args.interactive or not args.prompts:
            session.loop()
    except GenerationError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)  # the shell's status for Ctrl-C, without a traceback


if __name__ == "__main__":
    main()
