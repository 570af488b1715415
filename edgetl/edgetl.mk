# edgetl.mk — build a verified edge bundle from an image folder with make.
#
# Copy this file into a firmware repository (or include it from edgetl's checkout) and run:
#
#     make -f edgetl.mk model DATA=path/to/images TARGET=rpi4-cpu
#
# (`python -c "import edgetl, pathlib; print(pathlib.Path(edgetl.__file__).parent / 'edgetl.mk')"`
# prints where an installed edgetl keeps it.)
#
# Rules depend on content stamps, not on timestamps of whole folders: a second `make model` with
# unchanged inputs does nothing; a changed dataset retrains, exports and packages; a target change
# redoes only what depends on the changed part (e.g. parity thresholds: export and package, no
# retraining). Every step is an edgetl command with a documented exit code, so a parity failure
# (3) or a broken target constraint (4) stops the build.

EDGETL ?= edgetl
DATA ?= $(error set DATA=path/to/image/folder)
TARGET ?= rpi4-cpu
# A target name, or a path to your own <name>.toml.
TARGET_NAME := $(basename $(notdir $(TARGET)))
MODEL_DIR ?= build/$(TARGET_NAME)
FINETUNE_FLAGS ?=
EXPORT_FLAGS ?=
PACKAGE_FLAGS ?=
# What must exist before edgetl can run (e.g. an install stamp); order-only.
EDGETL_DEPS ?=

RUN := $(MODEL_DIR)/run
BUNDLE := $(MODEL_DIR)/bundles/run-$(TARGET_NAME).tar.gz

.PHONY: model edgetl-FORCE
model: $(BUNDLE)

# Content stamps: recomputed on every make (the `+` runs them under `make -n` too), rewritten only
# when their content changes.
$(MODEL_DIR)/data.stamp: edgetl-FORCE | $(EDGETL_DEPS)
	+@mkdir -p $(@D)
	+@find $(DATA) -type f -printf '%P %s %T@\n' | LC_ALL=C sort > $@.new
	+@echo "$(FINETUNE_FLAGS)" >> $@.new
	+@if cmp -s $@.new $@; then rm -f $@.new; else mv -f $@.new $@; fi

$(MODEL_DIR)/target-%.stamp: edgetl-FORCE | $(EDGETL_DEPS)
	+@mkdir -p $(@D)
	+@$(EDGETL) -q targets stamp $(TARGET) $* > $@.new
	+@if cmp -s $@.new $@; then rm -f $@.new; else mv -f $@.new $@; fi

$(RUN)/model.pt: $(MODEL_DIR)/data.stamp $(MODEL_DIR)/target-finetune.stamp
	rm -rf $(RUN).tmp
	$(EDGETL) finetune $(DATA) --out $(RUN).tmp --target $(TARGET) $(FINETUNE_FLAGS)
	rm -rf $(RUN)
	mv $(RUN).tmp $(RUN)

$(RUN)/exported.stamp: $(RUN)/model.pt $(MODEL_DIR)/target-export.stamp
	$(EDGETL) export $(RUN) --target $(TARGET) $(EXPORT_FLAGS)
	touch $@

$(BUNDLE): $(RUN)/exported.stamp $(MODEL_DIR)/target-package.stamp
	$(EDGETL) package $(RUN) --target $(TARGET) --out $(MODEL_DIR)/bundles $(PACKAGE_FLAGS)
	$(EDGETL) verify $@
