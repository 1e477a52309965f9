from django.db import models


class Note(models.Model):
    key = models.CharField(max_length=100, unique=True)
    text = models.TextField(blank=True)
