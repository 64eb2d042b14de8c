"""slides"""
