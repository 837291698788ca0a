"""Analysis: run records -> pandas, leaderboard tables and plots."""
