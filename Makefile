# Every target creates the virtual environment when it is missing (or when pyproject.toml changed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out
export SAM2_BUILD_CUDA = 0

.PHONY: demo test bench clean default-model

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# sam2 builds from source and imports torch in its setup.py: build it against the torch just installed.
	$(PY) -m pip install -q --no-build-isolation sam2==1.1.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# The embedded default model; until it is trained, a tiny random one shows the pipeline end to end.
DEFAULT_MODEL := weights/shapes-tiny
DEMO_MODEL := $(if $(wildcard $(DEFAULT_MODEL)/groundseg.json),$(DEFAULT_MODEL),$(OUT)/tiny-random)

demo: $(VENV)/.installed
	@test -f $(DEMO_MODEL)/groundseg.json || $(VENV)/bin/groundseg init-tiny $(DEMO_MODEL)
	$(VENV)/bin/groundseg predict --model $(DEMO_MODEL) --image examples/shapes.png \
		--question "Please segment the circle below the cyan shape." \
		--out $(OUT)/demo/result.json --overlay $(OUT)/demo/overlay.png
	$(VENV)/bin/groundseg predict --model $(DEMO_MODEL) --image examples/shapes.png \
		--question "Please segment all yellow shapes." --out $(OUT)/demo/all.json --overlay $(OUT)/demo/all.png
	$(VENV)/bin/groundseg predict --model $(DEMO_MODEL) --image examples/shapes.png --points 140,80,1 \
		--out $(OUT)/demo/click.json --overlay $(OUT)/demo/click.png

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py

# Rebuild the embedded default model from scratch (weights/shapes-tiny/MODEL_CARD.md has times and scores).
default-model: $(VENV)/.installed
	$(VENV)/bin/groundseg synth --out data/synth --images 3000 --seed 0
	# more scenes for the locator, which learns from phrases alone (its score rose with them)
	$(VENV)/bin/groundseg synth --out data/synth-s1 --images 9000 --seed 1
	$(VENV)/bin/groundseg synth --out data/synth-s2 --images 9000 --seed 2
	$(VENV)/bin/groundseg synth --out data/synth-s3 --images 9000 --seed 3
	$(VENV)/bin/groundseg synth --out data/synth-s4 --images 9000 --seed 4
	$(VENV)/bin/groundseg synth --out data/synth-s5 --images 9000 --seed 5
	$(VENV)/bin/groundseg train --config shapes/configs/shapes-tiny-v1-stage0.yaml --stop-after 750
	$(VENV)/bin/groundseg train --config shapes/configs/shapes-tiny-v2-stage1.yaml --stop-after 1000
	$(VENV)/bin/groundseg train --config shapes/configs/shapes-tiny-v2-stage2.yaml
	$(VENV)/bin/groundseg train-locator --model runs/shapes-tiny-v2/stage2/model --data data/synth \
		--out runs/shapes-tiny-v3/locator --steps 6000 --eval-every 1000
	$(VENV)/bin/groundseg train --config shapes/configs/shapes-tiny-v4-stage0.yaml
	$(VENV)/bin/groundseg train-locator --model runs/shapes-tiny-v4/stage0/model --data data/synth \
		--extra-data data/synth-s1 --extra-data data/synth-s2 --out runs/shapes-tiny-v4/locator \
		--steps 6000 --eval-every 1000
	$(VENV)/bin/groundseg train --config shapes/configs/shapes-tiny-v5-stage0.yaml
	$(VENV)/bin/groundseg train-locator --model runs/shapes-tiny-v5/stage0/model --data data/synth \
		--extra-data data/synth-s1 --extra-data data/synth-s2 --out runs/shapes-tiny-v5/locator \
		--layers 4 --steps 8000 --eval-every 1000
	$(VENV)/bin/groundseg train --config shapes/configs/shapes-tiny-v6-stage0.yaml
	$(VENV)/bin/groundseg train-locator --model runs/shapes-tiny-v6/stage0/model --data data/synth \
		--extra-data data/synth-s1 --extra-data data/synth-s2 --out runs/shapes-tiny-v6/locator \
		--layers 4 --steps 5000 --eval-every 1000
	$(VENV)/bin/groundseg train --config shapes/configs/shapes-tiny-v7-stage0.yaml
	$(VENV)/bin/groundseg train-locator --model runs/shapes-tiny-v7/stage0/model --data data/synth \
		--extra-data data/synth-s1 --extra-data data/synth-s2 --extra-data data/synth-s3 \
		--out runs/shapes-tiny-v7/locator --layers 4 --steps 5000 --eval-every 1000
	# the language model learns to answer bare shape names ("Please segment the circle."); the mask path is frozen
	$(VENV)/bin/groundseg train --config shapes/configs/shapes-tiny-v7-stage2.yaml
	$(VENV)/bin/groundseg train --config shapes/configs/shapes-tiny-v8-stage0.yaml
	$(VENV)/bin/groundseg train-locator --model runs/shapes-tiny-v8/stage0/model --data data/synth \
		--extra-data data/synth-s1 --extra-data data/synth-s2 --extra-data data/synth-s3 --extra-data data/synth-s4 \
		--out runs/shapes-tiny-v8/locator --layers 4 --steps 5000 --eval-every 1000
	$(VENV)/bin/groundseg train --config shapes/configs/shapes-tiny-v8-stage2.yaml
	$(VENV)/bin/groundseg train --config shapes/configs/shapes-tiny-v9-stage0.yaml
	$(VENV)/bin/groundseg train-locator --model runs/shapes-tiny-v9/stage0/model --data data/synth \
		--extra-data data/synth-s1 --extra-data data/synth-s2 --extra-data data/synth-s3 --extra-data data/synth-s4 \
		--extra-data data/synth-s5 --out runs/shapes-tiny-v9/locator --layers 4 --steps 5000 --eval-every 1000
	$(VENV)/bin/groundseg train --config shapes/configs/shapes-tiny-v9-stage2.yaml
	# the model's files are replaced; the model card and loss curves beside them stay
	rm -rf $(DEFAULT_MODEL)/model.safetensors $(DEFAULT_MODEL)/groundseg.json $(DEFAULT_MODEL)/tokenizer
	mkdir -p $(DEFAULT_MODEL) && cp -r runs/shapes-tiny-v9/stage2/model/. $(DEFAULT_MODEL)/
	# its add-ons: SAM decodes each mask again on a crop of 3 times the object's box side (mask_zoom), GrabCut
	# re-decides the outline's pixels, then what lies inside it (mask_refine); the decoder gets the locator's box
	# without its click, and masks are cut to that box grown by 5% (box_clip); the locator also reads the mirrored
	# image, and a phrase's k-th repeat takes its k-th distinct box (distinct_boxes); <ref> phrases
	# keep to the question's words (ref_copy, strict); a mask from clicks keeps the parts under them (clicked_parts); a
	# question mostly in words the model was never trained on (another language) gets a note, and its words are read
	# in the case the vocabulary knows, and a few everyday words it lacks ("objects", "gray") as the words they mean
	# (question_language)
	$(PY) -c "from grounding.config import GroundingConfig as C; c = C.load('$(DEFAULT_MODEL)'); \
		from shapes.question_language import SYNONYMS, training_words; \
		c.addons['locator'].update(click=False, mirror=True, distinct_boxes=True); \
		c.addons.update(ref_copy={'bias': 3.0, 'strict': True}, \
		mask_zoom={'context': 3.0}, mask_refine={'method': 'grabcut', 'interior': True}, box_clip={'margin': 0.05}, clicked_parts={}, \
		question_language={'language': 'English', 'fold_case': True, 'synonyms': SYNONYMS, \
		'words': training_words('data/synth', ('seg', 'rec', 'no_target', 'multi', 'region', 'category'))}); \
		c.save('$(DEFAULT_MODEL)')"
	# v14: the locator trains 4,000 steps more on the same phrases (a warm restart at half the learning rate)
	$(VENV)/bin/groundseg train-locator --model $(DEFAULT_MODEL) --data data/synth \
		--extra-data data/synth-s1 --extra-data data/synth-s2 --extra-data data/synth-s3 --extra-data data/synth-s4 \
		--extra-data data/synth-s5 --out runs/shapes-tiny-v14/locator --layers 4 --steps 4000 --lr 5e-4 --seed 13 \
		--eval-every 1000
	# v11: whether a phrase's object is there at all (presence) and what is in a marked region (region) are read by
	# two small heads on the tower's features, trained on cached features with every other weight kept
	$(VENV)/bin/groundseg train-presence --model runs/shapes-tiny-v14/locator/model --data data/synth \
		--extra-data data/synth-s1 --out runs/shapes-tiny-v14/presence
	# v12: the region head also checks plain targets ("the cyan square") in their box, at the level under which a
	# share of val's present plain phrases (clean and corrupted views) fall: 1% until v14, 5% since v14.1;
	# SAM's image encoder learns corrupted and zoomed views (every other weight kept);
	# v13: a fifth of those views grayscale
	$(VENV)/bin/groundseg train-region --model runs/shapes-tiny-v14/presence/model --data data/synth \
		--extra-data data/synth-s1 --out runs/shapes-tiny-v14/region --verify-share 0.05
	$(VENV)/bin/groundseg train-mask-encoder --model runs/shapes-tiny-v14/region/model --data data/synth \
		--extra-data data/synth-s1 --grey 0.2 --out runs/shapes-tiny-v14/mask-robust
	cp runs/shapes-tiny-v14/mask-robust/model/model.safetensors runs/shapes-tiny-v14/mask-robust/model/groundseg.json \
		$(DEFAULT_MODEL)/
	# v14.6: a "How many ..." answer starts with the number of its targets (count: after every add-on that drops one);
	# v14.7: an "all ..." answer also gets the objects the locator never reached (group_complete: before count)
	$(PY) -c "from grounding.config import GroundingConfig as C; c = C.load('$(DEFAULT_MODEL)'); \
		c.addons['group_complete'] = {}; c.addons['count'] = {}; c.save('$(DEFAULT_MODEL)')"
	# v15: grayscale images get a SAM image encoder of their own (grey_encoder), trained from SAM's with grey objects
	# of about their ground's brightness on blotchy grounds (camouflage); colour images are read as before
	$(VENV)/bin/groundseg train-mask-encoder --model $(DEFAULT_MODEL) --data data/synth --extra-data data/synth-s1 \
		--steps 1500 --lr 3e-4 --grey 0.5 --camouflage 0.8 --seed 15 --grey-encoder --out runs/shapes-tiny-v15/grey
	cp runs/shapes-tiny-v15/grey/model/model.safetensors runs/shapes-tiny-v15/grey/model/groundseg.json $(DEFAULT_MODEL)/
	# v16: grayscale images enter the vision tower through a patch embedding of their own (grey_tower), distilled
	# from the colour tower's features of the same scenes; colour images are read as before
	$(VENV)/bin/groundseg train-grey-tower --model $(DEFAULT_MODEL) --data data/synth --extra-data data/synth-s1 \
		--steps 2000 --lr 1e-3 --augment 0.5 --camouflage 0.3 --seed 16 --out runs/shapes-tiny-v16/grey-tower
	cp runs/shapes-tiny-v16/grey-tower/model/model.safetensors runs/shapes-tiny-v16/grey-tower/model/groundseg.json \
		$(DEFAULT_MODEL)/
	# v17: a plain target's kind is checked on its mask's silhouette by a small network (silhouette), trained on the
	# scenes' true masks and on masks the model decodes; its level set on val's answers
	$(VENV)/bin/groundseg train-silhouette --model $(DEFAULT_MODEL) --data data/synth --extra-data data/synth-s1 \
		--steps 1500 --seed 17 --out runs/shapes-tiny-v17/silhouette
	cp runs/shapes-tiny-v17/silhouette/model/model.safetensors runs/shapes-tiny-v17/silhouette/model/groundseg.json \
		$(DEFAULT_MODEL)/
	# v17.2: where a target's mask outline gives the kind it names, the region head reads the named colour alone, at
	# the level under which 2% of val's present phrases' colour readings fall (verify_colour: the joint reading's level
	# lies between its 2% and 5% quantiles)
	$(PY) -c "from shapes.region_verify import set_verify; set_verify('$(DEFAULT_MODEL)', 'data/synth', share=0.02, \
		colour_only=True)"

clean:
	rm -rf $(OUT) .pytest_cache
