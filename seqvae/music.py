"""Piano rolls as music: standard MIDI files (through mido, the `midi` extra) and audio.

Dimensions: n sequences, t time steps, k keys (88: MIDI notes 21..108, key j = note 21 + j).

A piano roll's time step is one beat (the JSB chorales are sampled at quarter notes), played
at `tempo` beats per minute (default 100). A key that is on over consecutive steps is one
held note; several sequences are written one after another into one track, each followed by
a rest of one bar. `roll_to_audio` renders a roll with plain sine tones, so that a notebook
can play it (IPython.display.Audio) without a MIDI synthesiser.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from torch import Tensor

from .checkpoint import atomic_write_bytes

__all__ = ["write_midi", "read_midi_notes", "roll_to_audio", "LOW_NOTE", "TEMPO"]

LOW_NOTE = 21  # MIDI note of key 0 (A0)
TEMPO = 100  # beats (time steps) per minute
TICKS_PER_BEAT = 480
VELOCITY = 80


def _mido():
    try:
        import mido
    except ImportError:
        raise ImportError("writing MIDI files needs the mido package: pip install 'seqvae[midi]' (or pip install mido)") from None
    return mido


def _notes(roll: np.ndarray, low_note: int) -> list[tuple[int, int, int]]:
    """(start step, end step, MIDI note) of every held note of a binary (t, k) roll."""
    on = np.pad(roll > 0.5, ((1, 1), (0, 0)))
    change = np.diff(on.astype(np.int8), axis=0)  # +1 at onsets, -1 at releases
    notes = []
    for key in range(roll.shape[1]):
        starts = np.flatnonzero(change[:, key] == 1)
        ends = np.flatnonzero(change[:, key] == -1)
        notes += [(int(s), int(e), low_note + key) for s, e in zip(starts, ends)]
    return sorted(notes)


def write_midi(rolls: Tensor | list[Tensor], path: str | os.PathLike, *, tempo: int = TEMPO, low_note: int = LOW_NOTE) -> Path:
    """Write piano rolls (n, t, k), values in {0, 1} (probabilities are thresholded at 0.5), as a
    standard MIDI file (type 0, one track); written atomically. Returns the path."""
    mido = _mido()
    rolls = [r.detach().float().cpu().numpy() if isinstance(r, Tensor) else np.asarray(r, dtype=np.float32) for r in rolls]
    if not rolls or any(r.ndim != 2 for r in rolls):
        raise ValueError("expected piano rolls of shape (sequences, time, keys)")
    if low_note < 0 or low_note + rolls[0].shape[1] - 1 > 127:
        raise ValueError(f"keys {low_note}..{low_note + rolls[0].shape[1] - 1} do not fit MIDI's notes 0..127")
    if not 1 <= tempo <= 1000:
        raise ValueError(f"tempo must be 1..1000 beats per minute, got {tempo}")
    track = mido.MidiTrack()
    track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(tempo), time=0))
    track.append(mido.Message("program_change", program=0, time=0))  # acoustic grand piano
    events, offset = [], 0
    for roll in rolls:
        for start, end, note in _notes(roll, low_note):
            events.append(((offset + end) * TICKS_PER_BEAT, 0, note))  # offs before ons at the same tick
            events.append(((offset + start) * TICKS_PER_BEAT, 1, note))
        offset += roll.shape[0] + 4  # a bar's rest between sequences
    now = 0
    for tick, is_on, note in sorted(events):
        kind = "note_on" if is_on else "note_off"
        track.append(mido.Message(kind, note=note, velocity=VELOCITY if is_on else 0, time=tick - now))
        now = tick
    track.append(mido.MetaMessage("end_of_track", time=TICKS_PER_BEAT))
    midi = mido.MidiFile(type=0, ticks_per_beat=TICKS_PER_BEAT)
    midi.tracks.append(track)
    buffer = io.BytesIO()
    midi.save(file=buffer)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def read_midi_notes(path: str | os.PathLike) -> list[tuple[float, float, int]]:
    """(start, end) in beats and the note of every note in a MIDI file (for checks and tests)."""
    mido = _mido()
    midi = mido.MidiFile(path)
    notes, pending, ticks = [], {}, 0
    for message in mido.merge_tracks(midi.tracks):
        ticks += message.time
        if message.type == "note_on" and message.velocity > 0:
            pending[message.note] = ticks
        elif message.type in ("note_off", "note_on") and message.note in pending:
            notes.append((pending.pop(message.note) / midi.ticks_per_beat, ticks / midi.ticks_per_beat, message.note))
    return sorted(notes)


def roll_to_audio(roll: Tensor, *, tempo: int = TEMPO, rate: int = 16000, low_note: int = LOW_NOTE) -> np.ndarray:
    """A (t, k) piano roll as mono audio in [-1, 1] (float32, `rate` samples per second): each
    held note a sine at its pitch with short fades, the chord scaled to avoid clipping."""
    roll = roll.detach().float().cpu().numpy() if isinstance(roll, Tensor) else np.asarray(roll, dtype=np.float32)
    step = 60.0 / tempo
    audio = np.zeros(int(np.ceil(roll.shape[0] * step * rate)) + 1, dtype=np.float64)
    for start, end, note in _notes(roll, low_note):
        a, b = int(start * step * rate), int(end * step * rate)
        t = np.arange(b - a) / rate
        tone = np.sin(2 * np.pi * 440.0 * 2 ** ((note - 69) / 12) * t)
        fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)  # 10 ms in and out: no clicks
        audio[a:b] += tone * fade
    peak = np.abs(audio).max()
    return (audio / peak * 0.8 if peak > 0 else audio).astype(np.float32)
