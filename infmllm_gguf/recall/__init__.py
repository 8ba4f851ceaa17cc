"""The streaming recall benchmark: can the model still answer about what left the cache?

`needles` (facts, questions, exact-match scoring), `plan` (one stream, many trials: needles at
controlled distances before snapshot points), `run` (a policy streams the plan and answers every
question from the exact state at its snapshot), `chat_rounds` (the chat variant: round-1 facts
asked N rounds later), `report` (table and heatmap).
"""
from .chat_rounds import ChatRecallRun, make_chat_plan, plot_chat, run_chat_recall
from .needles import KINDS, Needle, exact_match
from .plan import RecallPlan, log_distances, make_plan
from .report import heatmap, table
from .run import RecallRun, policies_to_run, run_recall, text_filler

__all__ = ["KINDS", "ChatRecallRun", "Needle", "RecallPlan", "RecallRun", "exact_match", "heatmap", "log_distances",
           "make_chat_plan", "make_plan", "plot_chat", "policies_to_run", "run_chat_recall", "run_recall", "table",
           "text_filler"]
