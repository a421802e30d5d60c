"""The embedded default model (``shapes-tiny``): its synthetic scenes, its stand-in pretraining stages, its
add-ons (addons.py: the [SEG] locator, mirror, box writer, ref copy, vision stem, projector norm) and the
recipe that trains it. The core (``grounding``) never imports this package: it finds the add-ons through the
``groundseg.addons`` entry point."""
