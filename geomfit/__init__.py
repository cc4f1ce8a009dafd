"""geomfit"""
