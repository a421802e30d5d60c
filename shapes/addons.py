"""The default model's add-ons, registered for the core under the ``groundseg.addons`` entry point:

  locator         each [SEG] also gives the mask decoder a click (and, for a ``FusionLocator``, a box) where its
                  phrase's object is (shapes/locator.py); it also writes the box text of generated answers
                  (shapes/box_writer.py) and can read the mirrored image too (shapes/locator_mirror.py);
  ref_copy        generated ``<ref>`` phrases lean to the question's words (shapes/ref_copy.py), or with ``strict``
                  keep to them (shapes/ref_strict.py);
  vision_stem     the vision tower reads pixels through a convolutional stem (shapes/vision_stem.py);
  projector_norm  a LayerNorm on the tower features before the projector (shapes/projector_norm.py);
  presence        whether a phrase's object is in the image at all: answers may not open with the denial, and a
                  target whose object the presence head does not find becomes "There is no ..." (shapes/presence.py);
  region          a region question (a box or a click) is answered with what a region head reads of the cells
                  under it, not the language model's description (shapes/region_head.py); "all ..." answers go on
                  while the locator's next peak holds another such object (shapes/group_count.py); with ``verify``,
                  a plain target ("the cyan square") the head does not read in its box is dropped
                  (shapes/region_verify.py);
  question_language  a note on the Prediction when the question is mostly in words the model was not trained on,
                  as another language is; the question's words in the case the vocabulary knows, and a few everyday
                  words it lacks ("objects", "gray") as the words they mean (shapes/question_language.py);
  grey_encoder    grayscale images (and their crops) are read by a SAM image encoder of their own
                  (shapes/grey_encoder.py);
  grey_tower      grayscale images enter the vision tower through a patch embedding of their own
                  (shapes/grey_tower.py);
  silhouette      a plain target whose mask's silhouette a small network does not read as the named kind moves to
                  another candidate or is dropped (shapes/silhouette_kind.py); right after ``region``;
  group_complete  an "all ..." answer also gets the objects of its group the locator never reached, found among the
                  mask decoder's object proposals (shapes/group_complete.py, shapes/object_proposals.py);
  count           a "How many ..." answer starts with the number of its targets, "There are 3 squares: "
                  (shapes/count_answer.py); put it last, after the add-ons that drop targets.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from grounding.addons import AddOn, AnswerRows, DecoderPrompts, SegRead, register_addon
from grounding.inference.steps import decode_with_steps, mask_steps_of
from grounding.result import box_from_mask
from grounding.text.boxes import box_iou
from segdecoder.refine import is_grey
from shapes.box_writer import BoxWriter, ref_phrase_ids
from shapes.count_answer import count_sentence
from shapes.group_complete import NOTE as GROUP_NOTE, group_names, more_of_group, settled
from shapes.group_count import GroupCount
from shapes.locator import (FusionLocator, Phrases, SegLocator, box_loss, cell_centres, distinct_cells, locator_loss,
                            mask_cells, peak_cells, square_boxes, square_to_pixels)
from shapes.locator_mirror import locate_both, mirror_ids, mirror_token_ids
from shapes.outline_kind import outline_kind
from shapes.presence import PresenceHead, presence_features
from shapes.presence_review import (NoDenialStart, add_targets, drop_absent, drop_targets, move_targets,
                                    moved_and_dropped, rename_targets)
from shapes.projector_norm import install_projector_norm
from shapes.question_language import CaseFolder, language_note, read_synonyms, shares_a_word, words_of
from shapes.region_head import RegionHead, Vocabulary, brightness_word, describe, region_box
from shapes.region_verify import (REPEAT_BOX_FIT, REPEAT_MASK_HOLDS, REPEAT_MASK_SHARE, most_held, plain_names,
                                  share_on, sureness)
from shapes.ref_copy import RefCopy, TokenWords
from shapes.ref_strict import StrictCopy
from shapes.silhouette_kind import SilhouetteNet, kind_probabilities, shows_kind, sure_of
from shapes.vision_stem import install_vision_stem

TIGHTENED_NOTE = ("target {number} ({phrase!r}) boxed by its mask's tight box: its box was loose about the mask, "
                  "which is the one its box gets")


@dataclass
class LocatorImage:
    """What the locator reads of one image: ``keys [g*g, width]`` (a ``FusionLocator``: the tower's patch
    features; a ``SegLocator``: the language model's image-token states), and ``mirrored`` the same of the image
    flipped left-right (a ``FusionLocator`` with ``mirror``)."""
    keys: torch.Tensor
    mirrored: torch.Tensor | None = None


@dataclass
class Located:
    """What the locator found for one image's n [SEG]s: ``scores [n, g*g]``; ``box_map [n, g*g, 4]`` (the box read
    at each cell, fractions of the padded square; None for a ``SegLocator``); ``clicks [n, 1, 2]`` pixel xy and
    ``boxes [n, 4]`` pixel xyxy (or None)."""
    scores: torch.Tensor
    box_map: torch.Tensor | None
    clicks: torch.Tensor
    boxes: torch.Tensor | None


@register_addon
class Locator(AddOn):
    @dataclass
    class Settings:
        kind: str = "fusion"        # "fusion": FusionLocator (reads the phrase and the tower's features); "seg":
                                    # SegLocator (scores the [SEG] state against the LM's image-token states)
        layers: int = 4             # fusion: transformer layers
        words: bool = False         # seg: the query also reads the phrase's mean word embedding
        layer: int = -1             # seg: the LM layer whose image-token states it scores (0: its input)
        click: bool = True          # the decoder gets the best cell's centre as a click (False: the box alone,
                                    # where the locator reads one)
        mirror: bool = False        # fusion: also read the mirrored image and phrase, and add both readings
        write_boxes: bool = True    # fusion, Qwen-VL box text: a generated <ref> phrase is followed by its box
        distinct_boxes: bool = False   # fusion: a repeated phrase's k-th target is at the k-th best cell that boxes
                                       # a new object (shapes/locator.py distinct_cells), not the k-th peak
        loss_weight: float = 1.0    # training: weight of the locator's loss

        def __post_init__(self):
            if self.kind not in ("fusion", "seg"):
                raise ValueError(f"locator kind must be 'fusion' or 'seg', got {self.kind!r}")

    name = "locator"

    @property
    def fusion(self) -> bool:
        return self.settings.kind == "fusion"

    @property
    def reads_hidden_states(self) -> bool:   # a SegLocator scores the language model's image-token states
        return not self.fusion

    @property
    def reads_phrases(self) -> bool:
        return self.fusion or self.settings.words

    # ---- building --------------------------------------------------------------------------------------------
    def attach(self, model: Any, tokenizer: Any) -> None:
        hidden = model.llava_config.text_config.hidden_size
        if self.fusion:
            self.net = FusionLocator(hidden, model.token_grid, layers=self.settings.layers,
                                     image_size=model.llava_config.vision_config.hidden_size)
        else:
            self.net = SegLocator(hidden, words=self.settings.words)
        self.mirror_table = mirror_token_ids(tokenizer)

    def grown(self, model: Any, tokenizer: Any, values: dict[str, Any]) -> AddOn:
        """The locator a training run asks for (``values``), keeping what this one learnt: a ``FusionLocator`` of
        more layers grows new ones that start as the identity (``FusionLocator.deepened``); a ``SegLocator`` gains
        its phrase-words query; another kind starts afresh."""
        settings = self.parse_settings({**self.settings_dict(), **values})
        if settings.kind != self.settings.kind or (self.fusion and settings.layers < self.settings.layers):
            fresh = Locator(settings)
            fresh.attach(model, tokenizer)
            return fresh.to(model.seg_projection.net[0].weight)
        twin = self.with_settings(values)
        if self.fusion and settings.layers > self.settings.layers:
            twin.net = self.net.deepened(settings.layers)
        if not self.fusion and settings.words and not self.settings.words:
            self.net.add_words()
        return twin

    # ---- reading images --------------------------------------------------------------------------------------
    def read_image(self, model, images, hidden_states=None, input_ids=None) -> list[LocatorImage]:
        if not self.fusion:
            return [LocatorImage(k) for k in self.image_states(model, hidden_states, input_ids)]
        mirror = self.settings.mirror
        # the tower's features do not depend on the question: computed once per image (in one batch), kept with it
        todo = list({id(p): p for p in images if "locator" not in p.extras or
                     (mirror and p.extras["locator"].mirrored is None)}.values())
        if todo:
            like = model.seg_projection.net[0].weight
            with torch.no_grad():
                pixels = torch.stack([p.vision for p in todo]).to(like.device, like.dtype)
                if mirror:   # the padded square flipped: its cells are the image's, mirrored
                    pixels = torch.cat([pixels, pixels.flip(-1)])
                features = model.vision_features(pixels)
            for i, p in enumerate(todo):
                p.extras["locator"] = LocatorImage(features[i], features[len(todo) + i] if mirror else None)
        return [p.extras["locator"] for p in images]

    def read_batch(self, model, pixel_values, hidden_states, input_ids) -> list[LocatorImage]:
        if not self.fusion:
            return [LocatorImage(k) for k in self.image_states(model, hidden_states, input_ids)]
        return [LocatorImage(k) for k in model.vision_features(pixel_values)]

    def image_states(self, model, hidden_states, input_ids) -> torch.Tensor:
        """The states of the image's patch tokens at the language model's layer ``settings.layer`` of
        ``hidden_states`` (each ``[B, T, h]``): ``[B, g*g, h]``, row-major over the token grid (a CLS token is
        dropped)."""
        states = hidden_states[self.settings.layer]
        is_image = input_ids == model.llava_config.image_token_id
        return torch.stack([states[b, is_image[b]] for b in range(len(input_ids))])[:, -model.token_grid ** 2:]

    # ---- [SEG] prompts ---------------------------------------------------------------------------------------
    def phrases(self, model, rows: list[torch.Tensor], mirrored: bool = False) -> Phrases:
        """Token ids ``[L_i]`` per phrase -> ``Phrases`` of input embeddings (and their mirrored twins)."""
        embed = model.vlm.get_input_embeddings()
        out = Phrases.stack([embed(ids) for ids in rows], embed.weight.shape[1], embed.weight)
        if mirrored:
            out.mirrored = self.phrases(model, [mirror_ids(ids, self.mirror_table) for ids in rows])
        return out

    def seg_prompts(self, model, seg: SegRead, image: LocatorImage, size, targets=None) -> DecoderPrompts:
        training = targets is not None
        mirror = self.settings.mirror and self.fusion and not training
        phrases = self.phrases(model, seg.phrase_ids, mirror) if self.reads_phrases else None
        cells = mask_cells(targets.to(seg.states.device), model.token_grid) if training else None
        ranks = seg.repeats().to(seg.states.device) if phrases is not None and not training else None
        found = self.locate(model, seg.states, image if mirror else LocatorImage(image.keys), phrases, size,
                            cells, ranks)
        loss = None
        if training and len(seg.states) and (term := locator_loss(found.scores, cells)) is not None:
            if found.box_map is not None:
                term = term + box_loss(found.box_map, square_boxes(targets.bool().cpu()), cells)
            loss = term.reshape(1).expand(int(cells.any(-1).sum()))
        clicks = found.clicks if self.settings.click or found.boxes is None else None
        labels = None if clicks is None else torch.ones(clicks.shape[:2], dtype=torch.long, device=clicks.device)
        return DecoderPrompts(clicks, labels, found.boxes, loss)

    def locate(self, model, states: torch.Tensor, image: LocatorImage, phrases: Phrases | None,
               size: tuple[int, int], targets: torch.Tensor | None = None,
               ranks: torch.Tensor | None = None) -> Located:
        """One image's [SEG]s (states ``[n, h]``) -> scores and prompts in the ``size = (H, W)`` image: a click at
        the best cell's centre, and the box read there (a ``FusionLocator``). In training (``targets`` bool
        ``[n, g*g]``) the best cell *on* the object, so the decoder learns to segment what is under a click that
        is right. ``ranks [n]`` (``SegRead.repeats``): a [SEG] repeating an earlier target's phrase takes the next
        peak. With ``image.mirrored`` and ``phrases.mirrored`` both readings are added (scores are then
        log-probabilities)."""
        grid = model.token_grid
        if not len(states):
            return Located(states.new_zeros((0, grid ** 2)), None, states.new_zeros((0, 1, 2)),
                           states.new_zeros((0, 4)) if self.fusion else None)
        if image.mirrored is not None and phrases is not None and phrases.mirrored is not None and self.fusion:
            scores, box_map = locate_both(self.net, states, image.keys, image.mirrored, phrases, grid)
        else:
            scores, box_map = self.net.locate(states, image.keys, phrases)
        pick = scores.detach()
        if targets is not None:
            pick = torch.where(targets.any(-1, keepdim=True) & ~targets, float("-inf"), pick)
        if ranks is None:
            cells = pick.argmax(-1)
        elif box_map is not None and self.settings.distinct_boxes:
            cells = distinct_cells(pick, box_map.detach(), ranks)
        else:
            cells = peak_cells(pick, grid, ranks)
        clicks = cell_centres(cells, grid, size)[:, None]
        boxes = None if box_map is None else square_to_pixels(box_map.detach()[torch.arange(len(cells)), cells], size)
        return Located(scores, box_map, clicks, boxes)

    # ---- answering -------------------------------------------------------------------------------------------
    def logits_rule(self, rows: AnswerRows) -> BoxWriter | None:
        if not (self.fusion and self.settings.write_boxes and rows.model.config.box_format == "qwen"):
            return None
        self.read_image(rows.model, rows.images)
        return BoxWriter(self, rows.model, rows.tokenizer, rows.images, rows.prefixes, rows.questions)


@register_addon
class RefCopyBias(AddOn):
    @dataclass
    class Settings:
        bias: float = 3.0           # nats added to the logits of tokens that go on copying the question's words
        strict: bool = False        # instead: a <ref> phrase must be a run of the question's words, and "the X and
                                    # the Y" gets a target for each (shapes/ref_strict.py)
        start_margin: float = 3.0   # strict: the phrase starts at the earliest question word within this many
                                    # nats of the model's favourite

    name = "ref_copy"

    def attach(self, model: Any, tokenizer: Any) -> None:
        self.words = TokenWords.of(tokenizer)

    def logits_rule(self, rows: AnswerRows) -> RefCopy | StrictCopy | None:
        if not self.settings.bias and not self.settings.strict:
            return None
        questions = [rows.tokenizer(q, add_special_tokens=False)["input_ids"] for q in rows.questions]
        if self.settings.strict:
            region = rows.addons.get("region")
            nouns = frozenset() if region is None else region.vocab.nouns()
            language = rows.addons.get("question_language")   # the training questions' words
            known = language.known if language is not None else frozenset()
            return StrictCopy(self.words, questions, rows.prefixes, self.settings.start_margin, nouns, known)
        return RefCopy(self.words, questions, rows.prefixes, self.settings.bias)


@register_addon
class Presence(AddOn):
    @dataclass
    class Settings:
        threshold: float = 0.0      # presence logit under which a target's object counts as absent
        mirror: bool = True         # also read the mirrored image and phrase (as the locator does); logits averaged
        outline_stands: bool = True   # a target whose mask clearly has the kind its phrase names is kept (``shown``)

    name = "presence"

    def attach(self, model: Any, tokenizer: Any) -> None:
        locator = model.addons["locator"] if "locator" in model.addons else None
        if locator is None or not locator.fusion:
            raise ValueError("the presence head reads the fusion locator: add the locator add-on (kind fusion) first")
        self.head = PresenceHead(locator.net.dim, model.token_grid ** 2)
        self.words = TokenWords.of(tokenizer)

    def logits_rule(self, rows: AnswerRows) -> NoDenialStart:
        return NoDenialStart(self.words, rows.prefixes)

    @torch.no_grad()
    def logits(self, model, tokenizer, image, phrases: list[str]) -> torch.Tensor:
        """Presence logits ``[n]`` of ``phrases`` (texts as an answer's ``<ref>`` holds them) in ``image``."""
        locator = model.addons["locator"]
        reading = locator.read_image(model, [image])[0]
        ids = [torch.tensor(ref_phrase_ids(tokenizer, p), device=reading.keys.device) for p in phrases]
        mirror = self.settings.mirror and reading.mirrored is not None
        read = locator.phrases(model, ids, mirror)
        out = self.head.classify(presence_features(locator.net, self.head, reading.keys, read))
        if mirror:
            out = (out + self.head.classify(presence_features(locator.net, self.head, reading.mirrored,
                                                              read.mirrored))) / 2
        return out.float()

    def review(self, model, tokenizer, image, query, prediction):
        # what the question names; a phrase of the model's own (a question in another language) names what it boxed
        question = query.question or ""
        phrases = sorted({t.phrase for t in prediction.targets if t.phrase and shares_a_word(t.phrase, question)})
        if not phrases:
            return prediction
        found = dict(zip(phrases, self.logits(model, tokenizer, image, phrases).tolist()))
        absent = {p: f"the presence head finds no such object in the image (logit {v:.2f})"
                  for p, v in found.items() if v < self.settings.threshold and not self.shown(model, prediction, p)}
        return drop_absent(prediction, absent) if absent else prediction

    def shown(self, model, prediction, phrase: str) -> bool:
        """Whether ``phrase`` names a kind that the mask of its first target clearly has (by its outline,
        ``outline_kind``, or a sure silhouette, ``sure_of``), under ``outline_stands`` and where the ``region``
        add-on has checked the colour it names in that target's box (``Region.verify``). The presence head reads the
        whole image and misses objects drawn unlike the training scenes (a rectangle standing up, a pure CSS yellow
        on white); a mask's outline does not."""
        region = model.addons["region"] if "region" in model.addons else None
        if not self.settings.outline_stands or region is None or region.settings.verify <= 0:
            return False
        names = plain_names(phrase, region.vocab)
        target = next(t for t in prediction.targets if t.phrase == phrase)
        return bool(names and names[1]) and shows_kind(model, target.mask, names[1][0])


@register_addon
class Region(AddOn):
    @dataclass
    class Settings:                 # the values each attribute can take, in the head's output order
        colours: tuple[str, ...] = ()
        kinds: tuple[str, ...] = ()
        sizes: tuple[str, ...] = ()
        textures: tuple[str, ...] = ()
        outlines: tuple[str, ...] = ()   # "" for none
        verify: float = 0.0         # a plain target ("the cyan square") whose box reads as what it names with a
                                    # probability under this is dropped (shapes/region_verify.py); 0: off
        verify_colour: float = 0.0  # the same of the colour alone, where the mask's outline gives the kind; 0: verify

    name = "region"
    RELOCATE_RANKS = 3              # ``relocate`` tries the locator candidates up to this rank (0: the best)
    SAME_MASK = 0.8                 # IoU at which the mask a box gets is the target's own (``tightened``)

    def attach(self, model: Any, tokenizer: Any) -> None:
        self.vocab = Vocabulary(*(list(getattr(self.settings, f)) for f in
                                  ("colours", "kinds", "sizes", "textures", "outlines")))
        self.head = RegionHead(model.llava_config.vision_config.hidden_size, model.token_grid, self.vocab.classes())
        self.words = TokenWords.of(tokenizer)

    def logits_rule(self, rows: AnswerRows) -> GroupCount | None:
        locator = rows.addons.get("locator")
        if locator is None or not locator.fusion or rows.model.config.box_format != "qwen":
            return None
        locator.read_image(rows.model, rows.images)
        return GroupCount(self, locator, rows.model, rows.tokenizer, self.words, rows.images, rows.prefixes)

    @torch.no_grad()
    def describe(self, model, image, box=None, point=None, mask=None) -> str:
        """What the head reads in a region of ``image`` (a ``PreparedImage``): a pixel box xyxy or a click xy; the
        kind is the one the object's mask outline clearly has (``outline_kind``) where it has one, and in a grayscale
        image the colour is the object's brightness (``brightness_word``). ``mask``: the object's mask (bool
        ``H x W``), else the mask the box or click gets."""
        locator = model.addons["locator"] if "locator" in model.addons else None
        if locator is not None and locator.fusion:
            keys = locator.read_image(model, [image])[0].keys
        else:
            like = model.seg_projection.net[0].weight
            keys = model.vision_features(image.vision[None].to(like.device, like.dtype))[0]
        region = region_box(image.size, box, point).to(keys.device, keys.dtype)
        values = {name: self.vocab.values(name)[int(p.argmax())]
                  for name, p in self.probabilities(keys, region).items()}
        mask = mask if mask is not None else self.marked_mask(model, image, box, point)
        kind = outline_kind(mask)
        if kind in self.vocab.kinds:
            values["kind"] = kind
        if is_grey(image.pixels) and mask.any():   # no colour to read: the object's brightness names it
            values["colour"] = brightness_word(image.pixels[..., 0][mask])
        return describe(values)

    @staticmethod
    def marked(model, image, box=None, point=None):
        """The mask a user's box (pixel xyxy) or click (xy) gets: the decoder on the image's cached embedding, then
        the model's mask steps. A ``MaskPrediction`` of one mask."""
        like = model.seg_projection.net[0].weight
        as_tensor = lambda v: torch.as_tensor(v, dtype=like.dtype, device=like.device)
        if box is not None:
            prompts = dict(boxes=as_tensor([list(box)]))
        else:   # one click is ambiguous (part or whole?): the best of SAM's three masks, as for a user's click
            prompts = dict(points=as_tensor([[list(point)]]), multimask=True,
                           point_labels=torch.ones(1, 1, dtype=torch.long, device=like.device))
        return decode_with_steps(model.mask_decoder, mask_steps_of(model.addons.values()), image.pixels,
                                 image.embedding.to(like.device), "prompt", **prompts)

    @classmethod
    def marked_mask(cls, model, image, box=None, point=None):
        """``marked``'s mask, bool ``H x W``."""
        return cls.marked(model, image, box, point).masks[0]

    @torch.no_grad()
    def verify(self, model, tokenizer, image, prediction):
        """``prediction`` without its plain targets whose box the head does not read as what they name (the first
        target of a phrase under ``verify``, a repeat of it, an "all ..." answer's further objects, under
        ``GroupCount.confidence``), nor any repeat whose mask's box overlaps its box under ``REPEAT_BOX_FIT``, whose
        mask is empty, lies on the phrase's earlier masks by more than ``REPEAT_MASK_SHARE`` of it or holds more than
        ``REPEAT_MASK_HOLDS`` of one of them. The kind a target's mask outline clearly has (``outline_kind``; the
        named one where the ``silhouette`` network reads it surely, ``sure_of``, whatever the outline) comes first:
        the named one needs no reading by the head (which misreads kinds on grey scenes), another ("the hexagon" on a
        pentagon) moves the target to the locator's candidate of the named kind (``relocate``), else drops it. A
        phrase's first target whose box is loose about its mask takes the mask's tight box first (``tightened``)."""
        keys = model.addons["locator"].read_image(model, [image])[0].keys
        dropped, moved, boxed, seen = {}, {}, {}, set()
        for i, target in enumerate(prediction.targets):
            names = plain_names(target.phrase or "", self.vocab)
            repeat = target.phrase in seen
            seen.add(target.phrase)
            if target.box is None:
                continue
            # a phrase's first target only: a further one whose mask is not its box's object is one of the model's
            # guesses of a group, dropped below
            if not repeat and target.mask is not None and (box := self.tightened(model, image, target)) is not None:
                target = dataclasses.replace(target, box=box)
                boxed[i] = (box, target.mask, target.score)
            if names is None and not repeat:
                continue
            # a group's further objects are the model's guesses (it writes about two whatever the count): they
            # need the sureness GroupCount asks of the ones it adds
            level = GroupCount.confidence if repeat else self.settings.verify
            kind = names[1][0] if names and names[1] else None
            read = outline_kind(target.mask) if kind and target.mask is not None else None
            if read != kind and kind and sure_of(model, target.mask, kind):
                read = kind
            if read is not None and read != kind:
                others = [t.box for t in prediction.targets if t.box is not None]
                found = self.relocate(model, tokenizer, image, target.phrase, names, level, others)
                if found is not None:
                    moved[i] = found
                else:
                    dropped[i] = f"its mask's outline is a {read}'s, not a {kind}'s, nor is any other candidate's"
                continue
            # a kind that the outline clearly has needs no reading by the head (which misreads the kinds of objects
            # drawn unlike its training scenes: a rectangle standing up); a colour named with it still does
            checked = None if names is None else (names[0], [] if read == kind else names[1])
            if checked is not None and not checked[1]:
                level = max(level, self.colour_level)
            square = region_box(image.size, target.box).to(keys.device, keys.dtype)
            mask_box = target.box_from_mask() if repeat and target.mask is not None else target.box
            fit = 0.0 if mask_box is None else box_iou(target.box, mask_box)   # None: an empty mask
            if checked is None:   # a repeat of "all shapes" and the like: one object of some kind, as GroupCount asks
                sure = float(self.probabilities(keys, square)["kind"].max())
                if (sure < level and target.mask is not None and fit >= REPEAT_BOX_FIT
                        and outline_kind(target.mask) is None):
                    dropped[i] = (f"the region head reads no kind in its box (at most probability {sure:.4f}, "
                                  f"needed {level:.4f}), nor has its mask a clear outline")
                    continue
            elif (sure := sureness(self, keys, square, *checked)) < level:
                dropped[i] = (f"the region head reads its box as {' '.join(sum(checked, []))} with "
                              f"probability {sure:.4f} only (needed {level:.4f})")
                continue
            if fit < REPEAT_BOX_FIT:   # a locator cell at an object's edge boxes it and its surroundings
                dropped[i] = (f"its mask's box overlaps its box by IoU {fit:.2f} only (needed {REPEAT_BOX_FIT}): "
                              f"not one object's box")
            elif repeat:
                earlier = [t.mask for k, t in enumerate(prediction.targets[:i])
                           if k not in dropped and t.phrase == target.phrase and t.mask is not None]
                if (shared := share_on(target.mask, earlier)) > REPEAT_MASK_SHARE:
                    dropped[i] = (f"{shared:.0%} of its mask lies on the masks of the phrase's earlier targets: not a "
                                  f"new object")
                elif (held := most_held(target.mask, earlier)) > REPEAT_MASK_HOLDS:
                    dropped[i] = f"its mask holds {held:.0%} of an earlier target's mask: not a new object"
        boxed = {i: found for i, found in boxed.items() if i not in moved and i not in dropped}
        if boxed:
            prediction = move_targets(prediction, boxed, image.size, TIGHTENED_NOTE)
        return moved_and_dropped(prediction, image.size, moved, dropped, "outline")

    @property
    def colour_level(self) -> float:
        """The level of the head's reading of a named colour alone (the kind read from the mask's outline)."""
        return self.settings.verify_colour or self.settings.verify

    def tightened(self, model, image, target) -> list[float] | None:
        """The tight pixel xyxy box of ``target``'s mask where its box is loose about it (they overlap under
        ``REPEAT_BOX_FIT`` IoU) and the mask is one whole object: the mask the box gets with the model's mask steps
        (``settled``) is the same, by IoU ``SAME_MASK``. A part of an object gets the whole object from a box, and a
        mask on a neighbour another mask: those keep their box. None where the box stands."""
        own = target.box_from_mask()
        if own is None or box_iou(target.box, own) >= REPEAT_BOX_FIT:
            return None
        marked, _ = settled(model, self, image, list(target.box))
        if marked is None:
            return None
        again, mask = marked.masks[0], target.mask
        return list(own) if (again & mask).sum() >= self.SAME_MASK * (again | mask).sum() else None

    def relocate(self, model, tokenizer, image, phrase: str, names: tuple[list[str], list[str]], level: float,
                 taken: list) -> tuple | None:
        """The first of the locator's candidates for ``phrase`` (ranks 0 to ``RELOCATE_RANKS``) whose box
        overlaps none of the ``taken`` boxes by more than ``GroupCount.overlap``, whose mask is one object's (its
        box fits the candidate's by IoU ``REPEAT_BOX_FIT``) of the named kind by its outline or ``sure_of``, and whose
        box the head reads as the named colour (if any) with probability ``level`` (at least ``colour_level``):
        (pixel xyxy box, bool ``H x W`` mask, score), or None."""
        locator = model.addons["locator"]
        keys = locator.read_image(model, [image])[0].keys
        ids = ref_phrase_ids(tokenizer, phrase)
        writer = BoxWriter(locator, model, tokenizer, [image], [[]])
        colours, (kind,) = names
        for rank in range(self.RELOCATE_RANKS + 1):
            box = writer.box(0, ids, rank)
            if any(box_iou(box, t) > GroupCount.overlap for t in taken):
                continue
            square = region_box(image.size, box).to(keys.device, keys.dtype)
            if colours and sureness(self, keys, square, colours, []) < max(level, self.colour_level):
                continue
            pred = self.marked(model, image, box=box)
            mask = pred.masks[0]
            own = box_from_mask(mask)
            if own is not None and box_iou(own, box) >= REPEAT_BOX_FIT and shows_kind(model, mask, kind):
                return box, mask, float(pred.scores[0])
        return None

    def probabilities(self, keys: torch.Tensor, region: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per attribute, the head's probabilities ``[values]`` for a region ``[4]`` (fractions of the square) of
        an image's cell features ``[g*g, width]``."""
        return {name: v[0].softmax(-1) for name, v in self.head(keys[None], region[None]).items()}

    def name_unasked(self, model, image, query, prediction):
        """``prediction`` with each generated target whose phrase shares no word with the question but "the", "of"
        and the like (a question in another language leaves the phrase to the model) named by the head's reading of
        its box instead."""
        targets = prediction.targets
        names = {i: self.describe(model, image, box=t.box, mask=t.mask) for i, t in enumerate(targets)
                 if t.box is not None and t.phrase and not shares_a_word(t.phrase, query.question or "")}
        if not names:
            return prediction
        again = {i: f"the same object as target {j + 1}" for i in names for j in names
                 if j < i and box_iou(targets[i].box, targets[j].box) > GroupCount.overlap}
        language = model.addons["question_language"] if "question_language" in model.addons else None
        known = language.known if language is not None else frozenset()
        unknown = [w for w in dict.fromkeys(words_of(query.question or "")) if known and w not in known]
        note = ("the question names nothing the model can copy"
                + (f" (words it never read: {', '.join(repr(w) for w in unknown)})" if unknown else "")
                + ": each target is named by the region head's reading of its box (its kind by its mask's outline, "
                  "where that is clear)")
        prediction = rename_targets(prediction, names)
        prediction = dataclasses.replace(prediction, notes=list(prediction.notes) + [note])
        return drop_targets(prediction, again) if again else prediction

    def review(self, model, tokenizer, image, query, prediction):
        if prediction.targets:   # the answer named objects: not a description
            if query.answer is None:
                prediction = self.name_unasked(model, image, query, prediction)
            return self.verify(model, tokenizer, image, prediction) if self.settings.verify > 0 else prediction
        if query.boxes is not None and len(query.boxes):
            text = self.describe(model, image, box=query.boxes[0])
        elif query.points is not None and len(query.points):
            labels = query.point_labels if query.point_labels is not None else [1] * len(query.points)
            clicks = [p for p, label in zip(query.points, labels) if int(label) == 1]
            if not clicks:
                return prediction
            text = self.describe(model, image, point=clicks[0])
        else:
            return prediction
        kept = [n for n in prediction.notes if not n.startswith("the answer names no object")]   # it describes one
        return dataclasses.replace(prediction, answer=text, notes=kept + [
            f"the description is the region head's reading of the marked region, its kind that of the marked "
            f"mask's outline where that is clear (the language model wrote "
            f"{prediction.answer!r})"])


@register_addon
class Silhouette(AddOn):
    """A second look at a plain target's kind ("the hexagon", "the red pentagon"): the kind its mask's silhouette
    has, read by a small network (shapes/silhouette_kind.py). Where the mask's outline says no kind clearly
    (``outline_kind``) and the network gives the named kind a probability under ``level``, the target moves to the
    locator's candidate of the named kind (``Region.relocate``), else is dropped. Put it right after ``region``."""
    @dataclass
    class Settings:
        kinds: tuple[str, ...] = ()   # the network's output order
        level: float = 0.0            # 0: off

    name = "silhouette"

    def attach(self, model: Any, tokenizer: Any) -> None:
        self.net = SilhouetteNet(len(self.settings.kinds))

    def probability(self, mask, kind: str) -> float:
        """The network's probability that the bool ``H x W`` ``mask`` is a ``kind``."""
        return float(kind_probabilities(self.net, [mask])[0, list(self.settings.kinds).index(kind)])

    def review(self, model, tokenizer, image, query, prediction):
        if self.settings.level <= 0 or "region" not in model.addons or not prediction.targets:
            return prediction
        region = model.addons["region"]
        dropped, moved = {}, {}
        for i, target in enumerate(prediction.targets):
            names = plain_names(target.phrase or "", region.vocab)
            if not names or not names[1] or target.mask is None or not target.mask.any():
                continue
            kind = names[1][0]
            if outline_kind(target.mask) is not None:   # a clear outline was read by the region check
                continue
            sure = self.probability(target.mask, kind)
            if sure >= self.settings.level:
                continue
            others = [t.box for t in prediction.targets if t.box is not None]
            found = region.relocate(model, tokenizer, image, target.phrase, names, region.settings.verify, others)
            if found is not None:
                moved[i] = found
            else:
                dropped[i] = (f"its mask's silhouette is a {kind}'s with probability {sure:.4f} only (needed "
                              f"{self.settings.level:.4f}), nor is any other candidate's outline")
        return moved_and_dropped(prediction, image.size, moved, dropped, "silhouette")


@register_addon
class QuestionLanguage(AddOn):
    @dataclass
    class Settings:
        language: str = "English"   # the language of the training questions
        words: tuple[str, ...] = ()  # every word of the training questions (question_language.training_words)
        share: float = 0.5          # note a question when more than this share of its words are not among them
        fold_case: bool = False     # words the vocabulary lacks as typed ("YELLOW") are read in a case it has
        synonyms: dict[str, str] = field(default_factory=dict)   # a word the training questions lack -> the words
                                                                 # it means (question_language.SYNONYMS)

    name = "question_language"

    def attach(self, model: Any, tokenizer: Any) -> None:
        self.folder = CaseFolder(tokenizer)   # settings may change later (``with_settings``): read them when used

    @property
    def known(self) -> frozenset[str]:
        """The words of the training questions (empty where the checkpoint does not list them)."""
        return frozenset(self.settings.words)

    def question(self, text: str) -> str:
        text = read_synonyms(text, self.settings.synonyms, self.known)[0]
        return self.folder(text) if self.settings.fold_case else text

    def review(self, model, tokenizer, image, query, prediction):
        read = read_synonyms(prediction.question or "", self.settings.synonyms, self.known)[1]
        if not read:
            return prediction
        said = ", ".join(f"{w!r} as {m!r}" for w, m in dict.fromkeys(read))
        return dataclasses.replace(prediction, notes=list(prediction.notes) + [
            f"read {said}: words the model was not trained on, read as the trained words they mean"])

    def notes(self, question: str, answer: str) -> list[str]:
        if not self.settings.words:
            return []
        note = language_note(question, self.known, self.settings.language, self.settings.share)
        return [] if note is None else [note]


@register_addon
class GreyEncoder(AddOn):
    """SAM's image encoder for grayscale images (shapes/grey_encoder.py): its own weights, ``encoder.*``."""
    name = "grey_encoder"
    built_in = True   # the mask decoder's encoding reads it, below every hook

    def attach(self, model: Any, tokenizer: Any) -> None:
        from shapes.grey_encoder import install

        install(self, model.mask_decoder)


@register_addon
class GreyTower(AddOn):
    """The vision tower's patch embedding for grayscale images (shapes/grey_tower.py): its own weights, ``stem.*``."""
    name = "grey_tower"
    built_in = True   # the vision tower reads it, below every hook

    def attach(self, model: Any, tokenizer: Any) -> None:
        from shapes.grey_tower import install

        install(self, model)


@register_addon
class GroupComplete(AddOn):
    @dataclass
    class Settings:
        most: int = 8               # objects added to one group at most

    name = "group_complete"

    def review(self, model, tokenizer, image, query, prediction):
        if "region" not in model.addons or "locator" not in model.addons:
            return prediction
        region = model.addons["region"]
        for phrase in dict.fromkeys(t.phrase for t in prediction.targets if t.phrase and t.box is not None):
            names = group_names(phrase, region.vocab)
            if names is None:
                continue
            have = sum(t.phrase == phrase for t in prediction.targets)
            limit = 2 - have if phrase.lower().startswith("both") else self.settings.most
            added = more_of_group(model, region, image, prediction, phrase, names, limit) if limit > 0 else []
            if added:
                prediction = add_targets(prediction, phrase, added, GROUP_NOTE)
        return prediction


@register_addon
class CountAnswer(AddOn):
    name = "count"

    def review(self, model, tokenizer, image, query, prediction):
        sentence = count_sentence(prediction.question or "", len(prediction.targets))
        return prediction if sentence is None else dataclasses.replace(prediction, answer=sentence + prediction.answer)


@register_addon
class VisionStem(AddOn):
    @dataclass
    class Settings:
        kind: str = "conv"

    name = "vision_stem"

    def adapt_vlm(self, vlm) -> None:
        install_vision_stem(vlm.model.vision_tower, self.settings.kind)


@register_addon
class ProjectorNorm(AddOn):
    name = "projector_norm"

    def adapt_vlm(self, vlm) -> None:
        install_projector_norm(vlm.model.multi_modal_projector, vlm.config.vision_config.hidden_size)
