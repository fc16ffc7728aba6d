/**
 * Who may call what on the TLS listener. A client is known by its certificate (mTLS): the roles
 * file (--tls-roles) maps a subject CN or a subjectAltName entry to a role. `viewer` may call
 * only the read-only RPCs below; `operator` may call everything. The unix socket (0660) and the
 * per-VM guest sockets do not go through this: they are local and already trusted.
 */
import fs from 'node:fs';
import type { PeerCertificate } from 'node:tls';

export type Role = 'viewer' | 'operator';
export const ROLES: readonly Role[] = ['viewer', 'operator'];

/** Full method paths ("/pkg.Service/Method") or whole services ("pkg.Service/*") a viewer may call. */
export const VIEWER_METHODS: readonly string[] = [
  '/hitless.v1.Upgrade/Status',
  '/hitless.v1.Upgrade/ShowCompatibility',
  '/hitless.v1.Upgrade/Events',
  '/hitless.v1.Checkpoint/Status',
  '/hitless.v1.Vm/List',
  '/hitless.v1.Vm/Get',
  '/hitless.v1.Vm/ConsoleLog',
  '/hitless.v1.Platform/Get',
  '/gnoi.os.OS/Verify',
  '/gnoi.system.System/RebootStatus',
  'grpc.health.v1.Health/*',
  'grpc.reflection.v1.ServerReflection/*',
  'grpc.reflection.v1alpha.ServerReflection/*',
];

export function roleAllows(role: Role, method: string): boolean {
  if (role === 'operator') return true;
  if (VIEWER_METHODS.includes(method)) return true;
  const service = method.replace(/^\//, '').split('/')[0];
  return VIEWER_METHODS.includes(`${service}/*`);
}

/** The roles file: {"<CN or SAN>": "viewer" | "operator", ...}. */
export function loadRoles(file: string): Map<string, Role> {
  let raw: unknown;
  try {
    raw = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new Error(`--tls-roles ${file}: cannot read it as JSON (${(e as Error).message}); expected {"<certificate CN or SAN>": "viewer"|"operator"}`);
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw))
    throw new Error(`--tls-roles ${file}: expected a JSON object mapping certificate CN or SAN to a role`);
  const out = new Map<string, Role>();
  for (const [who, role] of Object.entries(raw as Record<string, unknown>)) {
    if (!ROLES.includes(role as Role)) throw new Error(`--tls-roles ${file}: '${who}' has role '${String(role)}'; roles are ${ROLES.join(', ')}`);
    out.set(who, role as Role);
  }
  return out;
}

/** The names a certificate goes by: subject CN, then each SAN value (with and without its "DNS:" type prefix). */
export function certificateNames(cert: PeerCertificate | undefined): string[] {
  if (!cert || !cert.subject) return [];
  const names: string[] = [];
  const cn = cert.subject.CN as string | string[] | undefined;
  if (Array.isArray(cn)) names.push(...cn);
  else if (cn) names.push(cn);
  for (const entry of (cert.subjectaltname ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)) {
    names.push(entry);
    const i = entry.indexOf(':');
    if (i > 0) names.push(entry.slice(i + 1));
  }
  return names;
}

/** The role of a client certificate, and the name it was matched by (for messages and logs). */
export function roleOf(roles: Map<string, Role>, cert: PeerCertificate | undefined): { role: Role | null; name: string } {
  const names = certificateNames(cert);
  for (const n of names) {
    const r = roles.get(n);
    if (r) return { role: r, name: n };
  }
  return { role: null, name: names[0] ?? '(no certificate)' };
}
