/**
 * A throwaway certificate authority for tests (openssl CLI): a CA, a server certificate for
 * localhost/127.0.0.1 and client certificates by CN. Everything lives in a temp directory the
 * test removes; nothing is committed.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

export interface Pem {
  cert: string;
  key: string;
  certFile: string;
  keyFile: string;
}

const openssl = (args: string[]) => execFileSync('openssl', args, { stdio: ['ignore', 'pipe', 'pipe'] });

export class TestCa {
  readonly ca: Pem;

  constructor(
    readonly dir: string,
    readonly name: string,
  ) {
    fs.mkdirSync(dir, { recursive: true });
    const keyFile = path.join(dir, `${name}-ca.key`);
    const certFile = path.join(dir, `${name}-ca.crt`);
    openssl([
      'req',
      '-x509',
      '-newkey',
      'ec',
      '-pkeyopt',
      'ec_paramgen_curve:prime256v1',
      '-nodes',
      '-keyout',
      keyFile,
      '-out',
      certFile,
      '-subj',
      `/CN=${name} test CA`,
      '-days',
      '2',
    ]);
    this.ca = { keyFile, certFile, key: fs.readFileSync(keyFile, 'utf8'), cert: fs.readFileSync(certFile, 'utf8') };
  }

  /** A leaf certificate: `server` adds SANs localhost and 127.0.0.1; `san` adds more (e.g. "DNS:ops.example"). */
  issue(cn: string, opts: { server?: boolean; san?: string[] } = {}): Pem {
    const base = path.join(this.dir, `${this.name}-${cn.replace(/[^A-Za-z0-9_.-]/g, '_')}`);
    const keyFile = `${base}.key`;
    const certFile = `${base}.crt`;
    const csr = `${base}.csr`;
    const ext = `${base}.ext`;
    const sans = [...(opts.server ? ['DNS:localhost', 'IP:127.0.0.1'] : []), ...(opts.san ?? [])];
    fs.writeFileSync(
      ext,
      [
        'basicConstraints=CA:FALSE',
        `extendedKeyUsage=${opts.server ? 'serverAuth' : 'clientAuth'}`,
        ...(sans.length ? [`subjectAltName=${sans.join(',')}`] : []),
      ].join('\n') + '\n',
    );
    openssl(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', keyFile, '-out', csr, '-subj', `/CN=${cn}`]);
    openssl([
      'x509',
      '-req',
      '-in',
      csr,
      '-CA',
      this.ca.certFile,
      '-CAkey',
      this.ca.keyFile,
      '-CAcreateserial',
      '-out',
      certFile,
      '-days',
      '2',
      '-extfile',
      ext,
    ]);
    return { keyFile, certFile, key: fs.readFileSync(keyFile, 'utf8'), cert: fs.readFileSync(certFile, 'utf8') };
  }
}

/** Agent flags for a TLS listener on 127.0.0.1 (free port) with `roles`. */
export function tlsAgentArgs(ca: TestCa, server: Pem, roles: Record<string, string>, dir: string): string[] {
  const rolesFile = path.join(dir, 'roles.json');
  fs.writeFileSync(rolesFile, JSON.stringify(roles));
  return ['--grpc-tls', '127.0.0.1:0', '--tls-cert', server.certFile, '--tls-key', server.keyFile, '--tls-client-ca', ca.ca.certFile, '--tls-roles', rolesFile];
}
