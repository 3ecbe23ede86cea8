"""Thin LightningModules that wire models, prompt simulation, losses and optimisers."""
