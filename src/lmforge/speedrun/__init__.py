"""`lmforge speedrun`: raw text to a chat model in one command, with a report card.

plan.py sizes the stages for the time budget, data.py builds the chat and preference data from the
corpus, stages.py runs the stages (each a library call, each resumable), report.py writes report.md.
"""
