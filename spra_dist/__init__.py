"""spra_dist"""
