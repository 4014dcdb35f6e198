"""Objectives as `Task`s for the one loop: language modelling, classification, instruction tuning."""
