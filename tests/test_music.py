"""Piano rolls as MIDI files and audio: notes, times and pitches read back."""

import numpy as np
import pytest
import torch

from seqvae.music import read_midi_notes, roll_to_audio, write_midi


def test_a_roll_reads_back_as_the_same_notes(tmp_path):
    roll = torch.zeros(6, 88)
    roll[0:3, 39] = 1  # middle C (MIDI 60) held for 3 beats
    roll[1, 43] = 1  # E4 (64) on beat 2
    roll[4:6, 87] = 1  # C8 (108), the top key, to the end
    roll[2, 0] = 0.7  # A0 (21): a probability above 0.5 counts as on
    second = torch.zeros(2, 88)
    second[1, 48] = 1  # A4 (69) in the second sequence, after a 4-beat rest
    write_midi([roll, second], tmp_path / "x.mid", tempo=120)
    assert read_midi_notes(tmp_path / "x.mid") == [(0.0, 3.0, 60), (1.0, 2.0, 64), (2.0, 3.0, 21), (4.0, 6.0, 108), (11.0, 12.0, 69)]


def test_bad_rolls_are_refused(tmp_path):
    with pytest.raises(ValueError, match="do not fit MIDI"):
        write_midi(torch.zeros(1, 3, 88), tmp_path / "x.mid", low_note=60)
    with pytest.raises(ValueError, match="sequences, time, keys"):
        write_midi(torch.zeros(3, 88), tmp_path / "x.mid")


def test_audio_plays_each_note_at_its_pitch():
    roll = torch.zeros(2, 88)
    roll[:, 48] = 1  # A4 for two beats at 60 bpm: two seconds of 440 Hz
    audio = roll_to_audio(roll, tempo=60, rate=8000)
    assert audio.dtype == np.float32 and abs(len(audio) - 16000) <= 1 and np.abs(audio).max() == pytest.approx(0.8, abs=1e-6)
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.fft.rfftfreq(len(audio), 1 / 8000)[spectrum.argmax()] == pytest.approx(440, abs=1)
