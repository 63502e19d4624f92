"""``--model tokcomp``: a tokcomp session around every document lmms-eval sends, with its efficiency record.

    lmms-eval --model tokcomp \\
        --model_args 'pretrained=PATH,compress="ipcv(keep_ratio=0.35)+dart(keep_ratio=0.35)"' \\
        --tasks mme --batch_size 1 --log_samples --output_path out/

Model arguments (``--model_args``, comma-separated; quote the spec, lmms-eval splits at commas inside parentheses):

    pretrained            a local checkpoint folder (or hub id) of a model a tokcomp VLM adapter serves
    compress              a spec (``"ipcv(keep_ratio=0.35)+dart(keep_ratio=0.35)"``, ``none``) or a JSON/YAML file
    dtype                 auto (default: the checkpoint's) | bfloat16 | float16 | float32
    attn_implementation   sdpa | eager | flash_attention_2 (default: transformers' choice)
    seed                  the run seed every document's seed derives from (default 0; tokcomp.lmms.seeding)
    max_new_tokens        when the task sets none (default 128)
    system_prompt         text or a file, prepended as a system turn

Per document (``batch_size`` 1: every record is one document's prefill) the class opens a session with the
document's seeds, runs the processor and ``generate()``, and returns the answer with lmms-eval's token counts
(``input_tokens``: the compressed prompt length, text + the visual tokens the LLM held averaged over its layers,
i.e. the prompt the LLM received when only the vision side compresses) and the tokcomp
record (``token_counts.tokcomp`` in the samples file). After the last request every rank's records go to rank 0,
one per (task, doc_id); rank 0 prints a summary table and adds its means to ``results["throughput"]`` as
``avg_tokcomp_*`` (docs/evaluation.md).

Parallelism: data parallel only. Each rank loads one full model on its local device (``cuda:LOCAL_RANK`` or the
CPU); nothing wraps it (DDP synchronises gradients, which inference has none of), so sessions bind to the bare
transformers model; FSDP and DeepSpeed are refused before any weight is read.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms

from tokcomp.errors import ConfigError
from tokcomp.lmms import loading, records, seeding

_ACCEPTED = ("pretrained", "compress", "dtype", "attn_implementation", "seed", "max_new_tokens", "system_prompt",
             "device", "batch_size", "max_batch_size")


class TokcompTokenCounts(TokenCounts):
    """lmms-eval's per-request token counts plus the document's tokcomp record (written to the samples file)."""

    def __init__(self, input_tokens=None, output_tokens=None, reasoning_tokens=None, tokcomp=None):
        super().__init__(input_tokens, output_tokens, reasoning_tokens)
        self.tokcomp = tokcomp

    def to_dict(self):
        out = super().to_dict()
        if self.tokcomp is not None:
            out["tokcomp"] = self.tokcomp
        return out


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _images(items) -> list:
    """PIL images (RGB) of a document's visuals; anything else is refused by name."""
    from PIL import Image
    out = []
    for v in items:
        if isinstance(v, (list, tuple)):
            out.extend(_images(v))
        elif isinstance(v, Image.Image):
            out.append(v.convert("RGB"))
        elif isinstance(v, str) and v.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")):
            out.append(Image.open(v).convert("RGB"))
        else:
            kind = v.get("type", type(v).__name__) if isinstance(v, dict) else type(v).__name__
            raise ConfigError(f"--model tokcomp evaluates image tasks; this document has a {kind} visual ({v!r:.80}). "
                              "Videos and audio are not supported by the lmms-eval integration yet; pick an image "
                              "task.")
    return out


def _check_version() -> None:
    """Warn once when lmms-eval is not the release this integration is tested with (its request formats move)."""
    import warnings
    from importlib.metadata import version

    from tokcomp.lmms import TESTED_LMMS_EVAL
    found = version("lmms_eval")
    if found != TESTED_LMMS_EVAL and not getattr(_check_version, "done", False):
        _check_version.done = True
        warnings.warn(f"--model tokcomp is tested with lmms-eval {TESTED_LMMS_EVAL}; this is {found}. Fix: pip install "
                      f"--no-deps lmms-eval=={TESTED_LMMS_EVAL} (docs/evaluation.md), or check the results closely.",
                      UserWarning, stacklevel=3)


class _Tokcomp(lmms):
    """The shared implementation; :class:`TokcompChat` and :class:`TokcompSimple` differ in how a request becomes
    a prompt."""

    def __init__(self, pretrained: str, compress: str = "none", device: str | None = None, batch_size: Any = 1,
                 max_batch_size: Any = None, dtype: str = "auto", attn_implementation: str | None = None,
                 seed: int = 0, max_new_tokens: int = 128, system_prompt: str | None = None, **stray: Any) -> None:
        super().__init__()
        from accelerate import Accelerator

        import tokcomp
        self.pair = loading.parse_compress(compress, stray)            # before any weight is read
        if stray:
            raise ConfigError(f"--model tokcomp got unknown model_args {sorted(stray)}; it takes "
                              f"{', '.join(_ACCEPTED[:7])} (and lmms-eval's --device / --batch_size).")
        if str(batch_size) != "1":
            raise ConfigError(f"--model tokcomp runs batch_size 1 (got {batch_size!r}): each tokcomp record is one "
                              "document's prefill (its timings, KV bytes and FLOPs). Fix: --batch_size 1, and more "
                              "processes for throughput (accelerate launch --num_processes N).")
        loading.check_parallelism()                                    # env marks of --use_fsdp / --use_deepspeed
        self.accelerator = Accelerator()
        loading.check_parallelism(self.accelerator.distributed_type)
        self._device = loading.local_device(device, self.accelerator)
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        self._model, self.processor = loading.load_checkpoint(str(pretrained), self._device, str(dtype),
                                                              attn_implementation)
        tokcomp.compress(self._model, self.pair)     # validates adapter, needs, layers (each document opens its own)
        _check_version()
        self.spec = self.pair.spec
        self.seed = int(seed)
        self.max_new_tokens = int(max_new_tokens)
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self._records: dict[tuple[str, Any], dict] = {}
        #: after the run: every document's record on rank 0 (``{(task, doc_id): record}``) and the summaries
        self.tokcomp_records: dict[tuple[str, Any], dict] | None = None
        self.tokcomp_summary: dict[str, dict[str, float]] | None = None

    # -- what lmms-eval reads ------------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return 1

    # -- prompts -----------------------------------------------------------------------------------------
    def _messages(self, request: Instance) -> tuple[list[dict], list]:
        """``(hf chat messages, images)`` of a generation request."""
        raise NotImplementedError

    def _user_turn(self, text: str, images: list) -> list[dict]:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text.replace("<image>", "")}]
        return [{"role": "user", "content": content}]

    def _inputs(self, messages: list[dict], images: list):
        if self.system_prompt:
            messages = self._apply_system_prompt(messages, self.system_prompt)
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[text], images=images or None, return_tensors="pt")
        return text, inputs.to(self._device)

    # -- one document ------------------------------------------------------------------------------------
    def _run(self, request: Instance, fn):
        """``fn()`` (a generate or a scoring forward) inside this document's own session (the pair with the document's
        seeds) and torch generators seeded for the document; returns ``(fn's value, the closed session)``."""
        import tokcomp
        task, doc_id = request.task_name, request.doc_id
        pair = seeding.seeded_pair(self.pair, task, doc_id)
        session = tokcomp.compress(self._model, pair)
        with seeding.document_rng(seeding.mix(self.seed, task, doc_id), self._device), session, torch.inference_mode():
            value = fn()
        return value, session

    def _record(self, request: Instance, session, input_ids, new_tokens: int, seconds: float) -> dict:
        rec = records.document_record(session, input_ids, new_tokens, seconds,
                                      torch.empty((), dtype=self._model.dtype).element_size())
        rec["seed"] = seeding.mix(self.seed, request.task_name, request.doc_id)
        if not (request.metadata or {}).get("__padding_only__"):
            self._records.setdefault((request.task_name, request.doc_id), rec)
        return rec

    def _gen_kwargs(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        g = dict(gen_kwargs or {})
        until = g.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(g.get("temperature") or 0.0)
        sample = bool(g.get("do_sample")) or temperature > 0
        kw: dict[str, Any] = {"max_new_tokens": int(g.get("max_new_tokens") or self.max_new_tokens),
                              "do_sample": sample, "num_beams": int(g.get("num_beams") or 1)}
        if sample:
            kw["temperature"] = temperature or 1.0
            for k in ("top_p", "top_k"):
                if g.get(k) is not None:
                    kw[k] = g[k]
        pad = self.tokenizer.pad_token_id
        kw["pad_token_id"] = pad if pad is not None else self.tokenizer.eos_token_id
        return kw, until

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        from tqdm import tqdm
        out = []
        for request in tqdm(requests, disable=self.rank != 0, desc="tokcomp"):
            messages, images = self._messages(request)
            text, inputs = self._inputs(messages, images)
            gen_kwargs = request.args[1 if self.is_simple else 2]
            kw, until = self._gen_kwargs(gen_kwargs)

            def generate():
                _sync(self._device)
                t0 = time.perf_counter()
                ids = self._model.generate(**inputs, **kw)
                _sync(self._device)
                return ids, time.perf_counter() - t0
            (ids, seconds), session = self._run(request, generate)
            new = ids[0, inputs["input_ids"].shape[1]:]
            answer = self.tokenizer.decode(new, skip_special_tokens=True)
            for stop in until:
                if stop and stop in answer:
                    answer = answer[: answer.index(stop)]
            rec = self._record(request, session, inputs["input_ids"], int(new.numel()), seconds)
            counts = TokcompTokenCounts(input_tokens=round(rec["effective_prompt_tokens"]),
                                        output_tokens=int(new.numel()), tokcomp=rec)
            out.append(GenerationResult(text=answer, token_counts=counts))
            self.cache_hook.add_partial("generate_until", (text, gen_kwargs), answer)
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(mean negative log-likelihood of the continuation, greedy?)`` per request under compression: the
        prompt (context + images, chat template) followed by the continuation's tokens, one forward in the
        document's session. A loss, as lmms-eval's HF wrappers return and its multiple-choice scoring (argmin)
        expects."""
        from tokcomp.run import extend_inputs
        out = []
        for request in requests:
            ctx, target, doc_to_visual, doc_id, task, split = request.args[:6]
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            visuals = doc_to_visual(doc) if doc_to_visual is not None else []
            images = _images(visuals if isinstance(visuals, (list, tuple)) else [visuals])
            _, inputs = self._inputs(self._user_turn(ctx, images), images)
            cont = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
            cont = cont.to(self._device)
            full = extend_inputs(dict(inputs), cont)

            def score():
                _sync(self._device)
                t0 = time.perf_counter()
                logits = self._model(**full).logits
                _sync(self._device)
                return logits, time.perf_counter() - t0
            (logits, seconds), session = self._run(request, score)
            n = cont.shape[1]
            pred = logits[0, -n - 1:-1].float()
            nll = torch.nn.functional.cross_entropy(pred, cont[0], reduction="mean")
            self._record(request, session, full["input_ids"], 0, seconds)
            out.append((float(nll), bool((pred.argmax(-1) == cont[0]).all())))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("--model tokcomp does not run multi-round tasks yet (each round would be its own "
                                  "compressed prefill); pick a single-round task.")

    # -- after the last request --------------------------------------------------------------------------
    def clean(self) -> None:
        """Gather the records on rank 0 (every rank calls this at the same point, after lmms-eval's barrier), print
        the summary, add it to lmms-eval's throughput block; then lmms-eval's own clean-up (frees the model)."""
        self.finish()
        super().clean()

    def finish(self) -> None:
        """:meth:`clean` without freeing the model (for scripts that keep evaluating)."""
        import torch.distributed as dist
        merged = records.gather(self._records, dist)
        self._records = {}
        if merged is None:                      # not rank 0
            return
        self.tokcomp_records = merged
        self.tokcomp_summary = records.by_task(merged)
        if not merged:
            return
        from lmms_eval.models.model_utils.gen_metrics import log_metrics
        print(records.table(self.tokcomp_summary, self.spec), flush=True)
        overall = records.summarize(merged.values())
        total_s = sum(r["generate_s"] for r in merged.values())
        total_new = sum(r["new_tokens"] for r in merged.values())
        log_metrics(total_elapsed_time=total_s, total_gen_tokens=total_new,
                    avg_speed=total_new / total_s if total_s > 0 else 0.0,
                    additional_metrics={"total_requests": len(merged),
                                        **{f"tokcomp_{k}": v for k, v in overall.items()}})


class TokcompChat(_Tokcomp):
    """``--model tokcomp`` (lmms-eval's default chat interface: the task builds the messages)."""

    is_simple = False

    def _messages(self, request: Instance) -> tuple[list[dict], list]:
        from lmms_eval.protocol import ChatMessages
        _, doc_to_messages, _, doc_id, task, split = request.args[:6]
        chat = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
        images, videos, audios = chat.extract_media()
        if videos or audios:
            _images([{"type": "video" if videos else "audio"}])
        messages = chat.to_hf_messages()
        for m in messages:   # the processor gets the images separately, in order
            m["content"] = [{"type": "image"} if c.get("type") == "image" else c for c in m["content"]]
        return messages, _images(images)


class TokcompSimple(_Tokcomp):
    """``--model tokcomp --force_simple`` (a context string and ``doc_to_visual``: images first, then the text)."""

    is_simple = True

    def _messages(self, request: Instance) -> tuple[list[dict], list]:
        ctx, _, doc_to_visual, doc_id, task, split = request.args[:6]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        images = _images(visuals if isinstance(visuals, (list, tuple)) else [visuals])
        return self._user_turn(ctx, images), images
