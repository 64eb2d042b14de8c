"""stain"""
